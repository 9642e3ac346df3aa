"""The decode step with the Q8_0 head's exact products against its bf16 products, in turns.

Under bf16 compute the default model's head (Q8_0 as shipped) runs on bf16 products with
each row's top rescored from x in fp32 (models/quant_linear.py, Q8Linear.bf16_products);
under fp32 compute on exact products. This builds one engine as `ferrolm bench` does, decodes
`--sequences` x `--context` with the default model, and alternates the head between the two
(one untimed step after each switch, then two timed), so the machine's slow and fast
minutes hit both alike; it prints each side's median step and their ratio:

    .venv/bin/python bench/head_products.py --kv-dtype int4 --sequences 16 --context 128
"""

from __future__ import annotations

import argparse
import statistics

from ferrolm.data import sample_text
from ferrolm.eval.bench import BenchConfig, DecodeRun, bench_engine, prompts_from_text
from ferrolm.kv.spec import split_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-dtype", default="fp16", help="one KV spec (as ferrolm bench)")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="turns of each side, 2 timed steps a turn")
    args = ap.parse_args()
    if min(args.sequences, args.context, args.rounds) < 1:
        ap.error("--sequences, --context and --rounds must be >= 1")
    try:
        specs = split_specs(args.kv_dtype)
    except ValueError as e:
        ap.error(str(e))
    if len(specs) != 1:
        ap.error(f"--kv-dtype takes one KV spec, got {len(specs)}")
    kv = specs[0]
    cfg = BenchConfig(
        compute_dtype="auto",
        decode_concurrency=(args.sequences,),
        context_lens=(args.context,),
        kv_cache_memory_gb=4,
    )
    engine = bench_engine(cfg, kv)
    head = engine.runner.model.lm_head
    if not hasattr(head, "bf16_products"):
        raise SystemExit(f"the model's head is {type(head).__name__}, not a Q8_0 head as shipped")
    run = DecodeRun(engine, prompts_from_text(engine.tokenizer, sample_text(), args.sequences, args.context))
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        run.steps(3)
        for _ in range(args.rounds):
            for bf16 in times:
                head.bf16_products = bf16
                run.steps(1)
                step = run.steps(2)
                if len(step) < 2:
                    raise SystemExit(
                        "the sequences finished early; use a shorter --context or fewer --rounds"
                    )
                times[bf16] += step
    finally:
        run.close()
    exact, bf16 = (statistics.median(times[k]) * 1e3 for k in (False, True))
    print(
        f"{kv} {args.sequences} x {args.context}: a decode step with the exact head {exact:.2f} ms, "
        f"with bf16 products {bf16:.2f} ms ({bf16 / exact:.3f}x the time; medians of {len(times[True])} steps)"
    )


if __name__ == "__main__":
    main()
