"""Attention backends side by side: one layer's decode attention over a paged cache.

Times `attend` (median of repeats) of the torch reference and the compiled CPU backend
on the same pool, for SmolLM2-135M's shapes (9 query heads, 3 kv heads, head_dim 64,
blocks of 16, block tables scattered), at several (sequences, context) points, and
prints the effective read bandwidth of the compiled kernel (K and V bytes / time).

    .venv/bin/python bench/attention_kernels.py --kv-dtypes fp16,int8,fp8,int4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ferrolm.attention import AttentionMetadata, CpuBackend, TorchBackend
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec

KVH, H, D, BS = 3, 9, 64, 16


def time_attend(kv: str, B: int, L: int, backend, reps: int) -> float:
    per_seq = L // BS + 1
    nb = B * per_seq + 1
    pool = KvPool(KvSpec.parse(kv, 1), 1, KVH, D, num_blocks=nb, block_size=BS, staging_rows=nb)
    perm = torch.randperm(nb).tolist()
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(B)]
    meta = AttentionMetadata.build(tables, [0] * B, [L] * B, BS)
    backend.write(pool, 0, meta.slot_mapping, torch.randn(B * L, KVH, D), torch.randn(B * L, KVH, D))
    meta = AttentionMetadata.build(tables, [L] * B, [1] * B, BS)
    backend.write(pool, 0, meta.slot_mapping, torch.randn(B, KVH, D), torch.randn(B, KVH, D))
    q = torch.randn(B, H, D)
    for _ in range(3):
        backend.attend(q, 0, pool, meta, D**-0.5)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        backend.attend(q, 0, pool, meta, D**-0.5)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-dtypes", default="fp16,int8,fp8,int4")
    ap.add_argument("--points", default="1x512,1x2048,16x1024,16x2048,64x1024", help="SEQSxCONTEXT, ...")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    print(f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| KV | seqs | context | torch µs | compiled µs | compiled x torch | compiled x fp16 | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    fp16: dict[tuple[int, int], float] = {}
    for kv in args.kv_dtypes.split(","):
        spec = KvSpec.parse(kv, 1)
        for B, L in points:
            t_ref = time_attend(kv, B, L, TorchBackend(), args.repeats)
            t_cpu = time_attend(kv, B, L, CpuBackend(), args.repeats)
            if kv == "fp16":
                fp16[(B, L)] = t_cpu
            nbytes = (
                B * L * KVH * sum(f.bytes_per_head(D, BS) for f in (spec.layers[0].key, spec.layers[0].value))
            )
            x16 = f"{fp16[(B, L)] / t_cpu:.2f}" if (B, L) in fp16 else "-"
            print(
                f"| {kv} | {B} | {L} | {t_ref * 1e6:.0f} | {t_cpu * 1e6:.0f} | {t_ref / t_cpu:.1f} | {x16} | "
                f"{nbytes / t_cpu / 1e9:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
