"""Long-context capacity of a sliding-window model per KV dtype: how many sequences of
`--context` tokens one memory budget holds when the local layers keep only their window
(kv/groups.py), against keeping every layer's blocks, and a measured run.

For each KV dtype: the engine's own block accounting gives the sequences of each
context length that decode at once in `--memory-gb` (windows dropped, and every layer
kept: the same memory in blocks of all layers); then, in a `--run-memory-gb` cache,
`--requests` requests of `--context` tokens (prompt + `--max-tokens` generated, greedy,
EOS ignored) are submitted together, and the most of them decoding at the same step is
recorded, with the preemptions. Ratios are against fp16, from the same run.

    .venv/bin/python bench/window_capacity.py            # gemma3-270m: 1 GiB counted; 0.05 GiB run, 6 x 2048
    .venv/bin/python bench/window_capacity.py --kv-dtypes fp16,int8 --contexts 4096,32768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from capacity import prompts_from_text  # bench/capacity.py, beside this script

from ferrolm import LLMEngine, SamplingParams
from ferrolm.config import EngineConfig
from ferrolm.kv.blocks import blocks_needed
from ferrolm.kv.spec import spec_flags, split_specs


def fits(eng: LLMEngine, context: int, memory_gb: float) -> tuple[int, int]:
    """Sequences of `context` tokens decoding at once in `memory_gb` of this engine's blocks:
    (windows dropped, every layer kept). The engine's own accounting (kv/blocks.py)."""
    bm, groups = eng.blocks, eng.kv_groups
    usable = int(memory_gb * 2**30) // eng.pool.block_nbytes - bm.num_blocks + bm.num_usable
    dropped = usable // bm.max_blocks(context, chunk=1)
    whole_model_blocks = usable * groups.group_size // len(groups.layer_group)
    return dropped, whole_model_blocks // blocks_needed(context, bm.block_size)


def run_dtype(args, dtype: str) -> dict:
    cfg = EngineConfig().with_flags(
        dict(
            model=args.model,
            dtype=args.dtype,
            **spec_flags(dtype),
            kv_cache_memory_gb=args.run_memory_gb,
            max_num_seqs=args.requests,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
        )
    )
    eng = LLMEngine(cfg)
    fit = {c: fits(eng, c, args.memory_gb) for c in args.contexts}
    run_fit = fits(eng, args.context, args.run_memory_gb)
    prompt_len = args.context - args.max_tokens
    prompts = prompts_from_text(eng.tokenizer, args.requests, prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    peak_decoding, peak_bytes = 0, 0
    while eng.has_unfinished():
        eng.step()
        decoding = sum(1 for s in eng.scheduler.running if s.num_computed >= prompt_len)
        peak_decoding = max(peak_decoding, decoding)
        peak_bytes = max(peak_bytes, eng.stats()["kv_used_bytes"])
    stats = eng.stats()
    return {
        "dtype": dtype,
        "bytes_per_token": stats["kv_bytes_per_token"],
        "pool_bytes": stats["kv_pool_bytes"],
        "fits": {str(c): {"windows_dropped": a, "all_layers_kept": b} for c, (a, b) in fit.items()},
        "run_fits": {"windows_dropped": run_fit[0], "all_layers_kept": run_fit[1]},
        "peak_decoding": peak_decoding,
        "peak_used_bytes": peak_bytes,
        "preemptions": stats["num_preemptions"],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="auto", help="compute dtype")
    ap.add_argument("--kv-dtypes", dest="dtypes", default="fp16,int8,int8/int4")
    ap.add_argument("--memory-gb", type=float, default=1.0, help="KV budget of the table (counted)")
    ap.add_argument("--run-memory-gb", type=float, default=0.05, help="KV budget of the measured run")
    ap.add_argument("--contexts", default="1024,4096,8192,32768", help="context lengths to count fits for")
    ap.add_argument("--context", type=int, default=2048, help="context length of the measured run")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    args.contexts = sorted({*(int(c) for c in args.contexts.split(",")), args.context})

    results = []
    for d in split_specs(args.dtypes):
        results.append(run_dtype(args, d.strip()))
        r = results[-1]
        print(f"{d}: {r['seconds']:.0f} s, {r['preemptions']} preemptions", file=sys.stderr, flush=True)
    base = next((r for r in results if r["dtype"] == "fp16"), results[0])
    print(
        f"\n{args.model}, KV budget {args.memory_gb} GiB: sequences that fit at once (windows dropped / all layers kept)\n"
    )
    print(
        "| KV dtype | bytes/token (all layers) | "
        + " | ".join(f"{c:,} tokens" for c in args.contexts)
        + " | x fp16 at "
        f"{args.contexts[-1]:,} |"
    )
    print("|---|---|" + "---|" * len(args.contexts) + "---|")
    last = str(args.contexts[-1])
    for r in results:
        cells = [
            f"{r['fits'][str(c)]['windows_dropped']} / {r['fits'][str(c)]['all_layers_kept']}"
            for c in args.contexts
        ]
        ratio = r["fits"][last]["windows_dropped"] / max(1, base["fits"][last]["windows_dropped"])
        print(f"| {r['dtype']} | {r['bytes_per_token']:,} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    print(
        f"\nMeasured with a {args.run_memory_gb} GiB budget: {args.requests} requests of {args.context} tokens "
        f"({args.max_tokens} generated) submitted at once\n"
    )
    print(
        "| KV dtype | fit at once (windows dropped / all layers kept) | most decoding at once | preemptions | "
        "peak KV bytes used | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        f = r["run_fits"]
        print(
            f"| {r['dtype']} | {f['windows_dropped']} / {f['all_layers_kept']} | {r['peak_decoding']} | "
            f"{r['preemptions']} | {r['peak_used_bytes']:,} | {r['seconds']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
