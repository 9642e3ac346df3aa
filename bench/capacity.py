"""KV capacity per dtype under one memory budget, and throughput on a workload that
overflows fp16's cache.

For each KV dtype with the same `--memory-gb`: tokens the cache holds, how many
1024-token sequences fit at once, then `--requests` requests of `--prompt-len`
tokens generating `--max-tokens` each (greedy, EOS ignored), all submitted at
once: generated tokens/s, preemptions and peak concurrency. Ratios are against
fp16, measured in the same run.

    .venv/bin/python bench/capacity.py                # defaults: 0.6 GiB, 64 x (512 + 128)
    .venv/bin/python bench/capacity.py --kv-dtypes fp16,int8/int4 --requests 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ferrolm import LLMEngine, SamplingParams
from ferrolm.config import EngineConfig
from ferrolm.data import sample_text
from ferrolm.kv.spec import spec_flags, split_specs


def prompts_from_text(tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(sample_text())
    stride = max(1, (len(ids) - length) // max(1, n - 1))
    out = [ids[i * stride : i * stride + length] for i in range(n)]
    if any(len(p) < length for p in out):
        raise SystemExit(f"the text is too short for {n} prompts of {length} tokens")
    return out


def run_dtype(args, dtype: str) -> dict:
    cfg = EngineConfig().with_flags(
        dict(
            model=args.model,
            dtype=args.dtype,
            **spec_flags(dtype),
            kv_cache_memory_gb=args.memory_gb,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
        )
    )
    eng = LLMEngine(cfg)
    prompts = prompts_from_text(eng.tokenizer, args.requests, args.prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    cap = eng.stats()["kv_tokens_capacity"]
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.stats()["num_running"])
    elapsed = time.perf_counter() - start
    stats = eng.stats()
    generated = args.requests * args.max_tokens  # every request runs to max_tokens (EOS ignored)
    return {
        "dtype": dtype,
        "bytes_per_token": stats["kv_bytes_per_token"],
        "capacity_tokens": cap,
        "concurrent_1024": cap // 1024,
        "peak_running": peak,
        "preemptions": stats["num_preemptions"],
        "seconds": elapsed,
        "gen_tokens_per_s": generated / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--dtype", default="float32", help="compute dtype (float32: bf16 matmuls are slow on AVX2-only CPUs)"
    )
    ap.add_argument(
        "--kv-dtypes",
        "--dtypes",
        dest="dtypes",
        default="fp16,int8,int4,int8/int4",
        help="KV specs, comma separated (a dtype, a KEY/VALUE pair, or 'SPEC;LAYER=DTYPE...')",
    )
    ap.add_argument("--memory-gb", type=float, default=0.6)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()

    results = []
    for d in split_specs(args.dtypes):
        results.append(run_dtype(args, d.strip()))
        r = results[-1]
        print(
            f"{d}: {r['gen_tokens_per_s']:.1f} tok/s, {r['preemptions']} preemptions, {r['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    base = next((r for r in results if r["dtype"] == "fp16"), results[0])
    print(
        f"\nKV capacity at {args.memory_gb} GiB; workload {args.requests} x ({args.prompt_len} prompt + "
        f"{args.max_tokens} new), compute {args.dtype}\n"
    )
    print(
        "| KV dtype | bytes/token | tokens in cache | x fp16 | 1024-token seqs | peak running | "
        "preemptions | gen tok/s | x fp16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['dtype']} | {r['bytes_per_token']:,} | {r['capacity_tokens']:,} | "
            f"{r['capacity_tokens'] / base['capacity_tokens']:.2f} | {r['concurrent_1024']} | {r['peak_running']} | "
            f"{r['preemptions']} | {r['gen_tokens_per_s']:.1f} | {r['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
