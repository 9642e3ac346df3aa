"""The Triton paged-attention kernel alone, per KV format and launch setting, on a GPU.

One layer of Llama-3.2-1B's KV shape (8 kv heads of 64, 32 query heads), every sequence
a decode over `context` cached tokens; each setting (keys per tile, warps, pipeline
stages, context splits) is timed with triton.testing.do_bench (median, ms) and reported
with the bytes of K/V it must read per microsecond. For choosing the backend's launch
heuristics; `bench/gpu_decode.py` measures whole decode steps.

    python bench/gpu_attention.py --kv fp16,int8,int4 --points 64x8192,256x8192
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from ferrolm.attention import AttentionMetadata, TritonBackend
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="fp16,int8,int4,fp8")
    ap.add_argument("--points", default="64x8192,256x8192", help="SEQUENCESxCONTEXT,...")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--splits", default="0,4", help="0: the backend's own choice")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    ap.add_argument("--scale-tiles", default="0", help="0,1: per-token scales on scores / on tiles")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        from triton.testing import do_bench
    else:

        def do_bench(fn, rep):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    kvh, g, d, bs = 8, 4, 64, 128
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    grid = list(
        itertools.product(
            [int(x) for x in args.block_n.split(",")],
            [int(x) for x in args.warps.split(",")],
            [int(x) for x in args.stages.split(",")],
            [int(x) for x in args.splits.split(",")],
            [int(x) for x in args.scale_tiles.split(",")],
        )
    )
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}: one layer, {kvh} kv heads x {d}, G={g}, block {bs}")
    for kv in args.kv.split(","):
        spec = KvSpec.parse(kv, 1)
        cmax, nmax = max(c for c, _ in points), max(n for _, n in points)
        nblk = -(-(nmax + 1) // bs)
        pool = KvPool(spec, 1, kvh, d, cmax * nblk, bs, dev)
        slots = torch.arange(pool.num_slots, device=dev)
        for s in range(0, len(slots), 1 << 20):
            x = torch.randn(len(slots[s : s + (1 << 20)]), kvh, d, device=dev, dtype=torch.bfloat16)
            TritonBackend().write(pool, 0, slots[s : s + (1 << 20)], x, x)
        per_token = spec.bytes_per_token(kvh, d, bs)
        for c, n in points:
            tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(c)]
            meta = AttentionMetadata(tables, [n] * c, [1] * c, bs, dev)
            q = torch.randn(c, kvh * g, d, device=dev, dtype=torch.bfloat16)
            gb = c * (n + 1) * per_token / 1e9
            best = None
            ref = None
            for block_n, warps, stages, splits, tiles in grid:
                b = TritonBackend(splits or None, block_n, warps, stages, bool(tiles))
                try:
                    ms = do_bench(
                        lambda b=b, q=q, pool=pool, meta=meta: b.attend(q, 0, pool, meta, d**-0.5), rep=50
                    )
                except Exception as e:  # a setting the compiler rejects (registers, shared memory)
                    print(
                        f"{kv:8s} {c}x{n} n={block_n} w={warps} st={stages} sp={splits}: {type(e).__name__}"
                    )
                    continue
                out = b.attend(q, 0, pool, meta, d**-0.5).float()
                ref = out if ref is None else ref
                diff = (out - ref).abs().max().item() / ref.abs().max().item()
                label = f"n={block_n} w={warps} st={stages} sp={splits or 'auto'} tiles={tiles}"
                if best is None or ms < best[0]:
                    best = (ms, label)
                print(
                    f"{kv:8s} {c:4d}x{n:<5d} {label:32s} {ms * 1e3:8.1f} us  {gb / ms:7.2f} TB/s"
                    f"  (max diff to the first setting {diff:.1e})",
                    flush=True,
                )
            print(f"BEST {kv} {c}x{n}: {best[0] * 1e3:.1f} us ({best[1]})", flush=True)
        del pool
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
