"""Compile the Triton backend's kernels for a Hopper GPU (sm_90) on a machine with none.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every
interpreted test and still fail to compile (a non-constexpr global, a reassigned
constexpr). This stands in a driver that names an sm_90 target and compiles every kernel
the backend would launch (TTIR -> PTX -> cubin with the ptxas that ships with Triton)
without launching it. Run as a script in its own process (it replaces Triton's active
driver); exits non-zero on the first compile error.

    python tests/triton_aot.py          # every kind and storage dtype once (~30 s)
    python tests/triton_aot.py --all    # every format, two head shapes, both step kinds
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Hopper:
    """What JITFunction.run asks of a driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def main() -> int:
    driver.set_active(_Hopper())
    compiled: list[tuple[str, str]] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        target = next((ln for ln in kernel.asm["ptx"].splitlines() if ln.startswith(".target")), "?")
        assert "cubin" in kernel.asm, "no cubin"
        # A Hopper block has 227 KB of shared memory: more compiles but fails at launch.
        assert kernel.metadata.shared <= 227 * 1024, f"{self.fn.__name__}: {kernel.metadata.shared} B shared"
        compiled.append((self.fn.__name__, target))
        return kernel

    JITFunction.run = compile_only
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from ferrolm.attention.metadata import AttentionMetadata
    from ferrolm.attention.triton_backend import TritonBackend
    from ferrolm.kv.pool import KvPool
    from ferrolm.kv.spec import KvSpec

    full = "--all" in sys.argv
    # Without --all (the CPU suite): every storage dtype and kind once, in four pairs.
    formats = (
        ["fp16", "bf16", "fp32", "int8", "fp8", "fp8_e5m2", "int4", "int4_g16", "nf4", "int8/int4"]
        if full
        else ["fp16/int8", "bf16/fp8", "int4/nf4", "fp32/fp8_e5m2"]
    )
    steps = {"decode": ([20, 7], [1, 1]), "mixed": ([20, 0], [1, 5])}
    for pair in formats:
        for kvh, g, d in ((3, 3, 64), (8, 4, 128), (1, 4, 256)) if full else ((3, 3, 64), (1, 4, 256)):
            spec = KvSpec.build(1, pair)
            pool = KvPool(spec, 1, kvh, d, 8, 16)
            for starts, news in steps.values():
                meta = AttentionMetadata([[0, 1], [2, 3]], starts, news, 16)
                t = sum(news)
                for splits in (1, 4) if full else (1 if len(news) > 1 and news[1] > 1 else 4,):
                    backend = TritonBackend(splits=splits)
                    backend.write(pool, 0, meta.slot_mapping, torch.randn(t, kvh, d), torch.randn(t, kvh, d))
                    backend.attend(torch.randn(t, kvh * g, d), 0, pool, meta, d**-0.5)
        print(f"{pair}: compiled for {compiled[-1][1]}", flush=True)
    from ferrolm.kernels import triton_ops

    x = torch.randn(3, 576)
    for out_dtype in (torch.float32, torch.bfloat16):
        triton_ops.add_rms_norm(x, x.to(torch.bfloat16), torch.ones(576), 1e-5, out_dtype)
    qkv = torch.randn(3, 15 * 64, dtype=torch.bfloat16)
    triton_ops.rope_(qkv[:, : 9 * 64].view(3, 9, 64), torch.randn(3, 64), torch.randn(3, 64))
    triton_ops.silu_mul(torch.randn(3, 2 * 1536, dtype=torch.bfloat16))
    print(f"layer ops: compiled for {compiled[-1][1]}")
    print(f"{len(compiled)} kernel launches compiled, {len({c[0] for c in compiled})} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
