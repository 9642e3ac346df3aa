"""Build and load ferrolm's compiled CPU kernels, once per machine.

The C++ sources (SOURCES below; HEADERS) are compiled with torch.utils.cpp_extension on first
use, with -O3 -march=native so that its vector code becomes AVX-512 or AVX2 for the
CPU it runs on, and cached under FERROLM_HOME/kernels/<name>, where the name hashes the
source, the torch version and the CPU's flags (a home shared by different machines gets
one build per kind of CPU). Nothing is built at install time: a build-isolated install
would pull a CUDA torch. Without a C++ compiler or ninja, `load()` returns None and says
why once; the torch attention backend then serves every format.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from ferrolm.paths import ferrolm_home
from ferrolm.runtime import cpu_flags

log = logging.getLogger("ferrolm")
HERE = Path(__file__).parent
# The decode path's format pairs are instantiated in files of their own, so that ninja
# compiles them in parallel (one translation unit held them all: the build's long pole).
# Longest first: ninja starts them in this order.
SOURCES = [
    HERE / f
    for f in (
        "attention_decode_any.cpp",
        "attention_decode_4bit.cpp",
        "attention_decode_8bit.cpp",
        "attention_decode_16bit.cpp",
        "cpu_attention.cpp",
        "q4_linear.cpp",
        "q8_head.cpp",
        "layer_ops.cpp",
        "decoder.cpp",
    )
]
HEADERS = [
    HERE / f
    for f in ("simd.h", "ops.h", "claim.h", "attention_common.h", "attention_decode.h", "quant_rows.h")
]


# -fopenmp: at::parallel_for is inline and runs serially without it; the extension then
# shares torch's libgomp.so.1 (same soname, already loaded), so there is one thread pool.
# FERROLM_KERNEL_MARCH overrides -march=native (e.g. haswell: the AVX2 paths on an
# AVX-512 machine, as the tests do); FERROLM_KERNEL_OPT overrides -O3 (the AVX2 test builds
# with -O2: same source paths and numbers, a quarter of the compile time).
def cflags() -> list[str]:
    march = os.environ.get("FERROLM_KERNEL_MARCH", "native")
    opt = os.environ.get("FERROLM_KERNEL_OPT", "-O3")
    if opt not in ("-O1", "-O2", "-O3"):
        raise ValueError(f"FERROLM_KERNEL_OPT must be one of -O1, -O2, -O3, not {opt!r}")
    return [opt, f"-march={march}", "-fno-math-errno", "-fopenmp"]


_state: dict[str, object] = {}


def build_name() -> str:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(cflags() + sorted(cpu_flags()) + [platform.machine()]).encode())
    return f"ferrolm_cpu_{h.hexdigest()[:12]}"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None: they can)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the compiled CPU kernels target x86-64, this is {platform.machine()}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is missing (pip install ninja)"
    return None


def load() -> bool:
    """Build (first time) and load the kernels into torch.ops.ferrolm_cpu; False (with one
    warning naming the reason) when they cannot be built here."""
    if "ok" in _state:
        return bool(_state["ok"])
    why = unavailable_reason()
    if why is None:
        try:
            _build()
        except Exception as e:  # a failed build must not stop the engine: the torch backend serves
            why = f"the build failed: {_first_error(str(e)) or type(e).__name__}"
    if why is not None:
        log.warning("compiled CPU attention unavailable (%s); using the torch backend", why)
    _state["ok"] = why is None
    _state["why"] = why
    return why is None


def _first_error(text: str) -> str:
    """The compiler's first error line (ninja's own last line says only that it stopped)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "")


def failure() -> str | None:
    return _state.get("why")  # type: ignore[return-value]


def _build() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    name = build_name()
    directory = ferrolm_home() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    if fresh:
        log.info(
            "building the compiled CPU kernels for this CPU (once, about a minute on 2 cores) in %s",
            directory,
        )
    t0 = time.perf_counter()
    cpp_load(
        name=name,
        sources=[str(f) for f in SOURCES],
        extra_cflags=cflags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    if fresh:
        log.info("built the compiled CPU kernels in %.1f s", time.perf_counter() - t0)
