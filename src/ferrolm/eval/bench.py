"""Latency and throughput per KV dtype, optionally against HF transformers `generate`.

Each configuration (KV dtype x concurrency) runs `repeats` times; reported figures are
medians. Time to first token is measured per request from submission to its first
generated token; time per output token is (finish - first token) / (tokens - 1);
throughput is all output tokens over the wall time of the repeat. The HF baseline
runs the same weights (ferrolm's loaded tensors, HF's LlamaForCausalLM), same
prompts, same threads, in the same process and run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ferrolm.config import EngineConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.kv.spec import spec_flags
from ferrolm.runtime import cpu_description


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    kv_dtypes: tuple[str, ...] = ("fp16", "int8", "fp8")
    compute_dtype: str = "float32"
    weight_dtype: str = "auto"
    prompt_len: int = 256
    output_len: int = 64
    concurrency: tuple[int, ...] = (1, 4, 16)
    context_lens: tuple[int, ...] = (128, 512, 1024)
    decode_concurrency: tuple[int, ...] = (1,)  # the decode grid: these x context_lens
    decode_steps: int = 16
    repeats: int = 3
    kv_cache_memory_gb: float = 1.0
    baselines: tuple[str, ...] = ()  # "hf", "llama.cpp"
    llamacpp_cache_types: tuple[str, ...] = ("f16", "q8_0")
    llamacpp_decode_concurrency: tuple[int, ...] | None = None  # None: as decode_concurrency
    prefill_lens: tuple[int, ...] = ()  # prefill tokens/s of one prompt of each length


def prompts_from_text(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    if len(ids) < length + n:
        raise ValueError(f"the text has {len(ids)} tokens, too few for {n} prompts of {length}")
    stride = max(1, (len(ids) - length) // max(1, n))
    return [ids[i * stride : i * stride + length] for i in range(n)]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_engine_once(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    return run_engines_in_turns([engine], prompts, output_len)[0]


def run_engines_in_turns(engines: list[LLMEngine], prompts: list[list[int]], output_len: int) -> list[dict]:
    """The same requests on each engine, their steps taking turns (one step of each engine in
    turn until all finish), each engine's times on its own clock (the sum of its own steps):
    a slow minute of a noisy machine falls on all of them alike. Per engine: median TTFT and
    TPOT, and generated tokens/s."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for engine in engines:
        for i, p in enumerate(prompts):
            engine.add_request(f"bench-{i}", p, params)
    clock = [0.0] * len(engines)
    first: list[dict[str, float]] = [{} for _ in engines]
    done: list[dict[str, float]] = [{} for _ in engines]
    while any(e.has_unfinished() for e in engines):
        for k, engine in enumerate(engines):
            if not engine.has_unfinished():
                continue
            t = time.perf_counter()
            outs = engine.step()
            clock[k] += time.perf_counter() - t
            for o in outs:
                first[k].setdefault(o.request_id, clock[k])
                if o.finished:
                    done[k][o.request_id] = clock[k]
    return [
        {
            "ttft_s": _median(list(f.values())),
            "tpot_s": _median([(d[r] - f[r]) / (output_len - 1) for r in d]) if output_len > 1 else 0.0,
            "tokens_per_s": len(prompts) * output_len / c,
        }
        for f, d, c in zip(first, done, clock)
    ]


class DecodeRun:
    """len(prompts) sequences decoding on one engine, stepped on demand (so that two engines'
    steps can take turns): steps(k) returns the times of the next k steps in which every
    sequence decodes (not the steps that still prefill some prompt, and none after one
    finished); close() aborts the requests."""

    def __init__(self, engine: LLMEngine, prompts: list[list[int]]):
        self.engine, self.n = engine, len(prompts)
        self.ids = [f"grid-{i}" for i in range(len(prompts))]
        # No sequence may finish before the last one is prefilled (64 x 2048 prefills over
        # hundreds of steps while the first ones decode): run to the model's length.
        params = SamplingParams(temperature=0.0, max_tokens=engine.max_model_len, ignore_eos=True)
        for rid, p in zip(self.ids, prompts):
            engine.add_request(rid, p, params)
        self.prefilled: set[str] = set()

    def steps(self, k: int) -> list[float]:
        times: list[float] = []
        while self.engine.has_unfinished() and len(times) < k:
            all_decoding = len(self.prefilled) == self.n
            t = time.perf_counter()
            outs = self.engine.step()
            dt = time.perf_counter() - t
            if all_decoding and len(outs) == self.n and not any(o.finished for o in outs):
                times.append(dt)
            self.prefilled.update(o.request_id for o in outs)
        return times

    def close(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)


def decode_step_time(engine: LLMEngine, prompts: list[list[int]], steps: int) -> float:
    """Median seconds of one decode step of len(prompts) sequences (DecodeRun's steps)."""
    run = DecodeRun(engine, prompts)
    try:
        return _median(run.steps(steps))
    finally:
        run.close()


def interleaved_step_times(runs: list[DecodeRun], steps: int, turn: int) -> list[list[float]]:
    """Each run's decode step times, the runs taking turns: every turn is one untimed step
    (the engine's weights and cache back in the caches after the other's) and `turn` timed
    ones, until each run has `steps`; so a slow minute of a noisy machine slows them alike."""
    for r in runs:
        r.steps(1)  # through the prefill: the first step in which all decode
    times: list[list[float]] = [[] for _ in runs]
    while any(len(t) < steps for t in times):
        for r, t in zip(runs, times):
            if len(t) < steps:
                r.steps(1)
                got = r.steps(min(turn, steps - len(t)))
                if not got:
                    raise RuntimeError("a decode run ended before its timed steps")
                t.extend(got)
    return times


def decode_grid(step_time, tokenizer, text: str, concurrency, context_lens, steps: int) -> list[dict]:
    """Decode tokens/s at each (concurrent sequences, context length); step_time(prompts,
    steps) is one engine's median decode step (ferrolm's or a peer's)."""
    out = []
    for c in concurrency:
        for n in context_lens:
            step = step_time(prompts_from_text(tokenizer, text, c, n), steps)
            out.append({"concurrency": c, "context": n, "step_s": step, "tokens_per_s": c / step})
    return out


def hf_model_like(engine: LLMEngine):
    """HF transformers' model holding the very tensors ferrolm runs (models/hf_twin.py)."""
    from ferrolm.models.hf_twin import hf_twin

    return hf_twin(engine.model, engine.compute_dtype)


def run_hf_once(hf, prompts: list[list[int]], output_len: int) -> dict:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        wall = time.perf_counter() - t0
    tpot = (wall - ttft) / (output_len - 1) if output_len > 1 else float("nan")
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens_per_s": len(prompts) * output_len / wall}


def _summarise(runs: list[dict]) -> dict:
    return {k: _median([r[k] for r in runs]) for k in runs[0]}


def bench_engine(cfg: BenchConfig, kv: str) -> LLMEngine:
    """An engine as `ferrolm bench` runs one: cfg's model and dtypes, KV spec `kv`, room for
    every concurrency, no prefix caching (also bench/thread_scaling.py's)."""
    return LLMEngine(
        EngineConfig().with_flags(
            dict(
                model=cfg.model,
                dtype=cfg.compute_dtype,
                weight_dtype=cfg.weight_dtype,
                **spec_flags(kv),
                kv_cache_memory_gb=cfg.kv_cache_memory_gb,
                max_num_seqs=max(*cfg.concurrency, *cfg.decode_concurrency, 1),
                enable_prefix_caching=False,
            )
        )
    )


def _repeat(cfg: BenchConfig, once: Callable[[int], dict]) -> dict:
    """A short warm-up, then the medians of `repeats` full runs; once(output_len) runs one."""
    once(min(cfg.output_len, 4))
    return _summarise([once(cfg.output_len) for _ in range(cfg.repeats)])


def _prefill_row(cfg: BenchConfig, engine: str, kv: str, n: int, once: Callable[[], float]) -> dict:
    once()  # warm-up
    s = _median([once() for _ in range(cfg.repeats)])
    return {"engine": engine, "kv_dtype": kv, "prompt_len": n, "prefill_s": s, "tokens_per_s": n / s}


def _run_llamacpp(cfg, text, tokenizer, prompts, say, results, grid, prefill) -> None:
    from ferrolm.eval.llamacpp import LlamaCpp
    from ferrolm.models.registry import resolve_model

    gguf = resolve_model(cfg.model)
    if gguf.suffix != ".gguf":
        raise ValueError(f"the llama.cpp baseline needs a .gguf model, not {gguf}")
    n_seq = max(*cfg.concurrency, *cfg.decode_concurrency, 1)
    longest = max((*cfg.context_lens, *cfg.prefill_lens, 0))
    seq_ctx = max(cfg.prompt_len + cfg.output_len, longest + cfg.decode_steps) + 16
    for cache in cfg.llamacpp_cache_types:
        llm = LlamaCpp(str(gguf), cache, n_seq, seq_ctx, torch.get_num_threads())
        try:
            for c in cfg.concurrency:
                say(f"llama.cpp cache={cache} concurrency={c}")
                row = _repeat(cfg, lambda n, c=c, llm=llm: llm.generate(prompts[:c], n))
                results.append({"engine": "llama.cpp", "kv_dtype": cache, "concurrency": c, **row})
            grid_c = (
                cfg.decode_concurrency
                if cfg.llamacpp_decode_concurrency is None
                else cfg.llamacpp_decode_concurrency
            )
            if cfg.context_lens and grid_c:
                say(f"llama.cpp cache={cache} decode grid")
                rows = decode_grid(
                    llm.decode_step_time, tokenizer, text, grid_c, cfg.context_lens, cfg.decode_steps
                )
                grid.extend({"engine": "llama.cpp", "kv_dtype": cache, **row} for row in rows)
            for n in cfg.prefill_lens:
                prompt = prompts_from_text(tokenizer, text, 1, n)[0]
                once = lambda p=prompt, llm=llm: llm.prefill_time(p)  # noqa: E731
                prefill.append(_prefill_row(cfg, "llama.cpp", cache, n, once))
        finally:
            llm.close()


def _run_ferrolm(cfg: BenchConfig, kv: str, text: str, say, prefill, want_hf: bool):
    """One KV spec's prefill rows; returns the tokenizer and, when asked, the HF twin."""
    engine = bench_engine(cfg, kv)
    prompts = prompts_from_text(engine.tokenizer, text, max(cfg.concurrency), cfg.prompt_len)
    for n in cfg.prefill_lens:
        say(f"ferrolm kv={kv} prefill {n}")
        prompt = prompts_from_text(engine.tokenizer, text, 1, n)
        once = lambda p=prompt: run_engine_once(engine, p, 1)["ttft_s"]  # noqa: E731
        prefill.append(_prefill_row(cfg, "ferrolm", kv, n, once))
    return engine.tokenizer, (hf_model_like(engine), prompts) if want_hf else None


def _ferrolm_runs(cfg: BenchConfig, text: str, say) -> list[dict]:
    """Latency and throughput rows. Each KV spec runs in turns with fp16, step by step
    (run_engines_in_turns, after a short warm-up run), once per repeat: its x fp16 is the
    median of the ratios of those paired runs, and fp16's row the median of all its runs. This
    VM's speed moves by 20-50% within minutes; runs a minute apart (each spec alone, in turn)
    gave ratios off by as much. Without fp16 in the specs, each runs alone."""
    runs: dict[tuple[str, int], list[dict]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    others = [kv for kv in cfg.kv_dtypes if kv != "fp16"]
    paired = "fp16" in cfg.kv_dtypes and bool(others)
    prompts = None  # the peers' prompts: the first c of them at concurrency c
    for c in cfg.concurrency:
        base = bench_engine(cfg, "fp16") if paired else None
        for r in range(cfg.repeats):
            for kv in others if paired else cfg.kv_dtypes:
                say(
                    f"ferrolm kv={kv} concurrency={c} ({r + 1}/{cfg.repeats})"
                    + (", in turns with fp16" if base else "")
                )
                engines = [bench_engine(cfg, kv)] + ([base] if base else [])
                if prompts is None:
                    prompts = prompts_from_text(
                        engines[0].tokenizer, text, max(cfg.concurrency), cfg.prompt_len
                    )
                run_engines_in_turns(engines, prompts[:c], min(cfg.output_len, 4))
                got = run_engines_in_turns(engines, prompts[:c], cfg.output_len)
                runs.setdefault((kv, c), []).append(got[0])
                if base:
                    runs.setdefault(("fp16", c), []).append(got[1])
                    ratios.setdefault((kv, c), []).append(got[0]["tokens_per_s"] / got[1]["tokens_per_s"])
                del engines
        del base
    rows = []
    for kv in cfg.kv_dtypes:
        for c in cfg.concurrency:
            row = {"engine": "ferrolm", "kv_dtype": kv, "concurrency": c, **_summarise(runs[(kv, c)])}
            if (kv, c) in ratios:
                row["paired_x_fp16"] = _median(ratios[(kv, c)])
            rows.append(row)
    return rows


def _ferrolm_grid(cfg: BenchConfig, text: str, say) -> list[dict]:
    """ferrolm's decode grid point by point (_grid_point). Rows in spec order, as the other
    measurements."""
    rows = []
    for c in cfg.decode_concurrency:
        for n in cfg.context_lens:
            rows.extend(_grid_point(cfg, text, say, c, n))
    return sorted(rows, key=lambda r: cfg.kv_dtypes.index(r["kv_dtype"]))


def _grid_point(cfg: BenchConfig, text: str, say, c: int, n: int) -> list[dict]:
    """One point of the grid. Each KV spec's steps take turns with fp16's (two engines alive,
    `decode_steps` timed steps each, at most 4 at a time: interleaved_step_times), and its row
    keeps that fp16 median (paired_fp16_step_s), from which its ratio to fp16 comes: this
    VM's speed moves by 20-50% within minutes, far more than a format changes it, and steps
    taken seconds apart see the same machine. fp16's own row: the median of all its steps
    here. Without fp16 in the specs, each runs alone."""
    base = bench_engine(cfg, "fp16") if "fp16" in cfg.kv_dtypes else None
    tokenizer = base.tokenizer if base else None
    turn = max(1, min(4, cfg.decode_steps // 4))  # more steps: more turns, not longer ones
    rows, base_times = [], []
    for kv in (k for k in cfg.kv_dtypes if k != "fp16"):
        say(f"ferrolm kv={kv} decode {c} x {n}" + (", in turns with fp16" if base else ""))
        engine = bench_engine(cfg, kv)
        tokenizer = tokenizer or engine.tokenizer
        prompts = prompts_from_text(tokenizer, text, c, n)
        runs = [DecodeRun(engine, prompts)] + ([DecodeRun(base, prompts)] if base else [])
        try:
            times = interleaved_step_times(runs, cfg.decode_steps, turn)
        finally:
            for r in runs:
                r.close()
        rows.append(_grid_row(kv, c, n, _median(times[0])))
        if base:
            rows[-1]["paired_fp16_step_s"] = _median(times[1])
            base_times.extend(times[1])
    if base:
        if not base_times:  # fp16 alone in the specs
            say(f"ferrolm kv=fp16 decode {c} x {n}")
            base_times = [decode_step_time(base, prompts_from_text(tokenizer, text, c, n), cfg.decode_steps)]
        rows.append(_grid_row("fp16", c, n, _median(base_times)))
    return rows


def _grid_row(kv: str, c: int, n: int, step: float) -> dict:
    return {
        "engine": "ferrolm",
        "kv_dtype": kv,
        "concurrency": c,
        "context": n,
        "step_s": step,
        "tokens_per_s": c / step,
    }


def run_bench(cfg: BenchConfig, text: str, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda _: None)
    results, grid, prefill = [], [], []
    hf = tokenizer = None
    results.extend(_ferrolm_runs(cfg, text, say))
    for kv in cfg.kv_dtypes:
        want_hf = "hf" in cfg.baselines and hf is None
        tokenizer, twin = _run_ferrolm(cfg, kv, text, say, prefill, want_hf)
        hf = hf or twin
    if cfg.context_lens and cfg.decode_concurrency:
        grid.extend(_ferrolm_grid(cfg, text, say))
    if hf is not None:
        model, prompts = hf
        for c in cfg.concurrency:
            say(f"hf transformers concurrency={c}")
            row = _repeat(cfg, lambda n, c=c: run_hf_once(model, prompts[:c], n))
            results.append({"engine": "hf", "kv_dtype": "hf-dynamic-cache", "concurrency": c, **row})
        del model, hf
    if "llama.cpp" in cfg.baselines:
        prompts = prompts_from_text(tokenizer, text, max(cfg.concurrency), cfg.prompt_len)
        _run_llamacpp(cfg, text, tokenizer, prompts, say, results, grid, prefill)
    _add_ratios(results)
    for rows, key in ((grid, ("concurrency", "context")), (prefill, ("prompt_len",))):
        base = {
            tuple(r[k] for k in key): r for r in rows if (r["engine"], r["kv_dtype"]) == ("ferrolm", "fp16")
        }
        for r in rows:
            b = base.get(tuple(r[k] for k in key))
            if "paired_fp16_step_s" in r:  # fp16's steps taken in turns with this spec's
                r["x_fp16"] = r["paired_fp16_step_s"] / r["step_s"]
            else:
                r["x_fp16"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "results": results,
        "decode_grid": grid,
        "prefill": prefill,
    }


def _add_ratios(results: list[dict]) -> None:
    """ferrolm's tokens/s against its fp16 cache (paired runs where there were: _ferrolm_runs),
    HF and llama.cpp's f16 cache (same concurrency)."""
    by = {(r["engine"], r["kv_dtype"], r["concurrency"]): r for r in results}
    for r in results:
        c, ours = r["concurrency"], r["engine"] == "ferrolm"
        for key, base in (
            ("x_fp16", by.get(("ferrolm", "fp16", c))),
            ("x_hf", next((x for (e, _, k), x in by.items() if e == "hf" and k == c), None)),
            ("x_llamacpp", by.get(("llama.cpp", "f16", c))),
        ):
            r[key] = r["tokens_per_s"] / base["tokens_per_s"] if base and ours else None
        if "paired_x_fp16" in r:  # the median of its runs' ratios to the fp16 runs in turns with them
            r["x_fp16"] = r["paired_x_fp16"]


def _x(v) -> str:
    return f"{v:.2f}" if v is not None else "-"


def format_table(report: dict) -> str:
    lines = [
        f"CPU: {report.get('cpu', '?')}; threads {report['threads']}",
        "",
        "| engine | KV dtype | concurrency | TTFT ms | TPOT ms | out tok/s | x fp16 | x HF | x llama.cpp f16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if any("paired_x_fp16" in r for r in report["results"]):
        lines[2:2] = [
            "ferrolm's specs ran in turns with fp16, step by step; x fp16 is the median of those runs' ratios.",
            "",
        ]
    for r in report["results"]:
        lines.append(
            f"| {r['engine']} | {r['kv_dtype']} | {r['concurrency']} | {r['ttft_s'] * 1e3:.0f} | "
            f"{r['tpot_s'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {_x(r.get('x_fp16'))} | "
            f"{_x(r.get('x_hf'))} | {_x(r.get('x_llamacpp'))} |"
        )
    if report["decode_grid"]:
        lines += [
            "",
            "ferrolm's specs take turns with fp16 at each point; x fp16 is to fp16's steps of those turns.",
            "",
            "| engine | KV dtype | sequences | context | decode ms/step | decode tok/s | fp16 ms/step, in turns "
            "| x ferrolm fp16 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in report["decode_grid"]:
            paired = g.get("paired_fp16_step_s")
            lines.append(
                f"| {g.get('engine', 'ferrolm')} | {g['kv_dtype']} | {g['concurrency']} | {g['context']} | "
                f"{g['step_s'] * 1e3:.1f} | {g['tokens_per_s']:.1f} | {'-' if paired is None else f'{paired * 1e3:.1f}'} "
                f"| {_x(g.get('x_fp16'))} |"
            )
    if report.get("prefill"):
        lines += [
            "",
            "| engine | KV dtype | prompt tokens | prefill ms | prefill tok/s | x ferrolm fp16 |",
            "|---|---|---|---|---|---|",
        ]
        for p in report["prefill"]:
            lines.append(
                f"| {p['engine']} | {p['kv_dtype']} | {p['prompt_len']} | {p['prefill_s'] * 1e3:.0f} | "
                f"{p['tokens_per_s']:.0f} | {_x(p.get('x_fp16'))} |"
            )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        name = {"ferrolm": r["kv_dtype"], "hf": "HF transformers"}.get(
            r["engine"], f"{r['engine']} {r['kv_dtype']}"
        )
        series.setdefault(name, []).append((r["concurrency"], r["tokens_per_s"]))
    for name, pts in series.items():
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent requests")
    ax1.set_ylabel("output tokens/s")
    ax1.legend()
    top = max((g["concurrency"] for g in report["decode_grid"]), default=1)
    curves: dict[str, list[tuple[int, float]]] = {}
    for g in report["decode_grid"]:
        if g["concurrency"] == top:
            name = (
                g["kv_dtype"] if g.get("engine", "ferrolm") == "ferrolm" else f"{g['engine']} {g['kv_dtype']}"
            )
            curves.setdefault(name, []).append((g["context"], g["tokens_per_s"]))
    for kv, pts in curves.items():
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kv)
    ax2.set_xlabel("context length (tokens)")
    ax2.set_ylabel(f"decode tokens/s ({top} sequences)")
    ax2.legend()
    fig.suptitle(f"ferrolm bench: {report['config']['model']}, compute {report['config']['compute_dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
