"""How much faster a decode step runs on two threads than on one, per KV dtype.

One engine per KV dtype decodes `--sequences` x `--context` with the default model; the
engines take turns, and their steps alternate between one thread and `--threads` threads
(torch.set_num_threads between turns, one untimed step at the start of each), so a VM's
slow and fast minutes hit every dtype and both sides alike. Each step is timed
as a whole and in its parts: the compiled layer loop (models/decoder_plan.py), the head
(compute_logits) and the rest (Python, metadata, sampling). For each part it prints the
medians, the speedup and the serial equivalent s, from t(N) = s + (t(1) - s) / N: the
milliseconds of the part that ran as if on one thread (2 t(2) - t(1) for two threads).
Run it where the step's fixed part is in question (what one parallel region per step
could recover, against what the machine loses when both cores work):

    .venv/bin/python bench/thread_scaling.py --kv-dtypes fp16,int8,int4,fp8 --sequences 16 --context 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from ferrolm.data import sample_text
from ferrolm.eval.bench import BenchConfig, DecodeRun, bench_engine, prompts_from_text
from ferrolm.kv.spec import split_specs


def _timed(fn, key: str, times: dict[str, float]):
    """fn, its last call's seconds kept in times[key]."""

    def call(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        times[key] = time.perf_counter() - t
        return out

    return call


class _TimedPlan:
    """The compiled layer loop with its run timed (a TorchScript object: not patchable)."""

    def __init__(self, plan, times: dict[str, float]) -> None:
        self._plan, self.run = plan, _timed(plan.run, "loop", times)

    def __getattr__(self, attr: str):
        return getattr(self._plan, attr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-dtypes", default="fp16,int4", help="KV specs, comma separated (as ferrolm bench)")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="the many-thread side (the other is one)")
    ap.add_argument("--rounds", type=int, default=8, help="turns of each side, 3 timed steps a turn")
    args = ap.parse_args()
    if min(args.sequences, args.context, args.rounds) < 1 or args.threads < 2:
        ap.error("--sequences, --context and --rounds must be >= 1, --threads >= 2")
    try:
        kv_dtypes = split_specs(args.kv_dtypes)
    except ValueError as e:
        ap.error(str(e))
    cfg = BenchConfig(
        compute_dtype="auto",
        decode_concurrency=(args.sequences,),
        context_lens=(args.context,),
        kv_cache_memory_gb=4,
    )
    now: dict[str, float] = {}
    runs: dict[str, DecodeRun] = {}
    try:
        for kv in kv_dtypes:
            engine = bench_engine(cfg, kv)
            runner = engine.runner
            if runner.plan is None:
                raise SystemExit("no compiled layer loop here (the compiled kernels are not available)")
            runner.plan = _TimedPlan(runner.plan, now)
            if "compute_logits" not in vars(runner.model):  # engines share one loaded model
                runner.model.compute_logits = _timed(runner.model.compute_logits, "head", now)
            prompts = prompts_from_text(engine.tokenizer, sample_text(), args.sequences, args.context)
            runs[kv] = DecodeRun(engine, prompts)
            runs[kv].steps(4)
        sides = (1, args.threads)
        parts = {(kv, n): defaultdict(list) for kv in runs for n in sides}
        for _ in range(args.rounds):
            for n in sides:
                torch.set_num_threads(n)
                for kv, run in runs.items():
                    run.steps(1)
                    for _ in range(3):
                        step = run.steps(1)
                        if not step:
                            raise SystemExit("the sequences finished early; use a shorter --context")
                        p = parts[kv, n]
                        p["step"].append(step[0])
                        p["loop"].append(now["loop"])
                        p["head"].append(now["head"])
                        p["rest"].append(step[0] - now["loop"] - now["head"])
    finally:
        for run in runs.values():
            run.close()
    print(
        f"{args.sequences} x {args.context}, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.rounds} rounds in turns, ms (medians)"
    )
    print(
        f"| KV | part | 1 thread | {args.threads} threads | speedup | serial equivalent |\n|---|---|---|---|---|---|"
    )
    for kv in runs:
        for key in ("step", "loop", "head", "rest"):
            one = statistics.median(parts[kv, 1][key]) * 1e3
            many = statistics.median(parts[kv, args.threads][key]) * 1e3
            serial = (args.threads * many - one) / (args.threads - 1)
            print(f"| {kv} | {key} | {one:.2f} | {many:.2f} | {one / many:.2f}x | {serial:.2f} |")


if __name__ == "__main__":
    main()
