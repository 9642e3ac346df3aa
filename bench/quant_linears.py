"""The compiled 4-bit linears and the Q8_0 head alone, at SmolLM2-135M's shapes.

One repeat runs every linear of the 30 layers once (fused q/k/v 576 -> 960, o 576 -> 576,
fused gate/up 576 -> 3072, down 1536 -> 576), random GGUF-style Q4 codes, scales and
minima (~60 MB: from memory, as in a real step), on a batch of `--rows` bf16 rows; then
the Q8_0 head (576 -> 49,152, ~28 MB) both ways it runs: exact products (fp32 compute) and
bf16 products with each row's top rescored (bf16 compute), in turns. Prints the median time
of each over `--seconds`.
To compare two commits, run it from each checkout in turn, alternating (the machine drifts):

    .venv/bin/python bench/quant_linears.py --rows 16
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/quant_linears.py --rows 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ferrolm.kernels import build

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer
VOCAB = 49152


def median_ms(fn, seconds: float) -> tuple[float, int]:
    fn()
    times = []
    start = time.time()
    while time.time() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="batch rows (concurrent sequences in a decode step)")
    ap.add_argument("--seconds", type=float, default=4.0, help="time each part this long")
    args = ap.parse_args()
    if args.rows < 1 or args.seconds <= 0:
        ap.error("--rows must be at least 1 and --seconds positive")
    if not build.load():
        raise SystemExit("the compiled kernels are not available here")
    g = torch.Generator().manual_seed(0)
    linears = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
            scales = (torch.rand(n, k // 32, generator=g) * 0.01).half()
            mins = (torch.rand(n, k // 32, generator=g) * -0.1).half()
            linears.append((codes, scales, mins, k))
    head_codes = torch.randint(-127, 128, (VOCAB, 576), dtype=torch.int8, generator=g)
    head_scales = (torch.rand(VOCAB, 576 // 32, generator=g) * 0.01).half()
    x = {k: torch.randn(args.rows, k, generator=g).bfloat16() for k in (576, 1536)}
    x_head = x[576].float()
    ops = torch.ops.ferrolm_cpu

    def q4() -> None:
        for codes, scales, mins, k in linears:
            ops.q4_linear(x[k], codes, scales, mins)

    print(f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    ms, n = median_ms(q4, args.seconds)
    print(f"Q4 linears, 30 layers, {args.rows} rows: median {ms:.2f} ms ({n} repeats)")
    heads = {"exact products": False, "bf16 products, top rescored": True}
    times: dict[str, list[float]] = {name: [] for name in heads}
    start = time.time()
    while time.time() - start < 2 * args.seconds:  # in turns: the machine drifts
        for name, bf16 in heads.items():
            t = time.perf_counter()
            ops.q8_linear(x_head, head_codes, head_scales, bf16)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(
            f"Q8_0 head, {name}, {args.rows} rows: median {statistics.median(ts) * 1e3:.2f} ms ({len(ts)} repeats)"
        )


if __name__ == "__main__":
    main()
