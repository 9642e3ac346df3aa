"""Attention backends side by side: one layer's decode attention over a paged cache.

Times `attend` (median of repeats) of the torch reference and the compiled CPU backend
on the same pool, for SmolLM2-135M's shapes (9 query heads, 3 kv heads, head_dim 64), at
several (sequences, context) points, and prints the effective read bandwidth of the
compiled kernel (K and V bytes / time). Each repeat runs every one of `--layers` layers
(30 = the model's: the cache is then as large as in a real step, far past the caches),
reported per layer. Block tables are in order (a fresh pool) or `--scattered` (a pool
in use), in blocks of `--block-size` tokens (the engine's default 128).

    .venv/bin/python bench/attention_kernels.py --kv-dtypes fp16,int8,fp8,int4 --scattered
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ferrolm.attention import AttentionMetadata, CpuBackend, TorchBackend
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec
from ferrolm.runtime import resolve_compute_dtype

KVH, H, D = 3, 9, 64


def time_attend(
    kv: str, B: int, L: int, backend, reps: int, layers: int, bs: int, scattered: bool, qdt=torch.float32
) -> float:
    """Median seconds of one layer's attend (each repeat runs all `layers` layers)."""
    per_seq = L // bs + 1
    nb = B * per_seq + 1
    pool = KvPool(KvSpec.parse(kv, layers), layers, KVH, D, num_blocks=nb, block_size=bs, staging_rows=nb)
    order = torch.randperm(nb).tolist() if scattered else list(range(nb))
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(B)]
    meta = AttentionMetadata.build(tables, [0] * B, [L] * B, bs)
    for layer in range(layers):
        backend.write(pool, layer, meta.slot_mapping, torch.randn(B * L, KVH, D), torch.randn(B * L, KVH, D))
    meta = AttentionMetadata.build(tables, [L] * B, [1] * B, bs)
    for layer in range(layers):
        backend.write(pool, layer, meta.slot_mapping, torch.randn(B, KVH, D), torch.randn(B, KVH, D))
    q = torch.randn(B, H, D).to(qdt)
    for _ in range(2):
        backend.attend(q, 0, pool, meta, D**-0.5)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for layer in range(layers):
            backend.attend(q, layer, pool, meta, D**-0.5)
        times.append((time.perf_counter() - t) / layers)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-dtypes", default="fp16,int8,fp8,int4")
    ap.add_argument("--points", default="1x512,1x2048,16x1024,16x2048,64x1024", help="SEQSxCONTEXT, ...")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30, help="layers per repeat (30: SmolLM2's)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--scattered", action="store_true", help="blocks in random order (a pool in use)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the queries' dtype, as the engine's compute dtype (auto: bf16 where the CPU has it)",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the torch backend (slow at 30 layers)")
    args = ap.parse_args()
    bs = args.block_size
    qdt = resolve_compute_dtype(args.dtype)
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    print(
        f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"queries {qdt}, {args.layers} layers, blocks of {bs}, {'scattered' if args.scattered else 'in order'}"
    )
    print("| KV | seqs | context | torch µs | compiled x torch | compiled µs | compiled x fp16 | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    fp16: dict[tuple[int, int], float] = {}
    for kv in args.kv_dtypes.split(","):
        spec = KvSpec.parse(kv, 1)
        for B, L in points:
            run = (B, L, args.repeats, args.layers, bs, args.scattered, qdt)
            t_ref = float("nan") if args.no_reference else time_attend(kv, *run[:2], TorchBackend(), *run[2:])
            t_cpu = time_attend(kv, B, L, CpuBackend(), *run[2:])
            if kv == "fp16":
                fp16[(B, L)] = t_cpu
            nbytes = (
                B * L * KVH * sum(f.bytes_per_head(D, bs) for f in (spec.layers[0].key, spec.layers[0].value))
            )
            x16 = f"{fp16[(B, L)] / t_cpu:.2f}" if (B, L) in fp16 else "-"
            ref = "- | -" if args.no_reference else f"{t_ref * 1e6:.0f} | {t_ref / t_cpu:.1f}"
            print(
                f"| {kv} | {B} | {L} | {ref} | {t_cpu * 1e6:.0f} | {x16} | {nbytes / t_cpu / 1e9:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
