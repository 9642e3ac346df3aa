"""Process-level tuning the engine applies once when it starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_allocator() -> bool:
    """Keep freed tens-of-MB buffers in the heap for reuse (glibc only).

    glibc serves allocations above its mmap threshold with fresh mmap'd pages, which the
    kernel must fault in and zero on every use: each decode step allocates context-sized
    temporaries (gathered K/V, scores), and page faults made them several times slower
    than the arithmetic. Raising the threshold to 64 MiB keeps those in the heap; larger
    buffers (the KV pool itself) are still mmap'd and go back to the OS when freed.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1 and ok)
    except (OSError, AttributeError):  # not glibc
        return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); on AVX2-only CPUs
    torch widens bf16 to fp32 around every kernel and bf16 is several times slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when torch sees a GPU, else the CPU; 'cuda' without one is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(f"device cuda: torch {torch.__version__} ({built}) sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' -> bf16 on CUDA and where the CPU has native bf16, else fp32; or the named dtype."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cpu_description() -> str:
    """The CPU model, its core count and the flags that decide speed here (for reports)."""
    import os

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "none of avx2/avx512/amx"
    return f"{name}, {os.cpu_count()} cores, {flags}, torch {torch.backends.cpu.get_cpu_capability()}"
