"""KV quality report: perplexity, KL divergence and top-1 agreement per KV dtype.

Driven through the engine's public API: each window is one request with
`prompt_logprobs=-1` (each step's full log-distributions), computed in chunks of
`chunk` tokens (`long_prefill_token_threshold`), all windows of a dtype as one
batch, so every scored token attends to keys and values read back from that
dtype's cache, its own chunk included. Positions before `prefix` are context only.
The engines of all dtypes step in lock-step, chunk by chunk, so the fp32-cache
reference distribution of each chunk is compared at once and never stored whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ferrolm.config import EngineConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.kv.blocks import blocks_needed
from ferrolm.kv.dtypes import FORMATS, KvCacheDtype
from ferrolm.kv.spec import spec_flags

REFERENCE = "fp32"


@dataclass
class DtypeScore:
    dtype: str
    bytes_per_token: int
    nll: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)

    def record(self, ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll.append(-logp.gather(1, targets.unsqueeze(1)).squeeze(1))
        self.kl.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0))
        self.agree.append(ref_logp.argmax(-1) == logp.argmax(-1))

    def summary(self, ref_ppl: float | None, fp16_bytes: int) -> dict:
        nll, kl, agree = torch.cat(self.nll), torch.cat(self.kl), torch.cat(self.agree)
        ppl = math.exp(nll.double().mean().item())
        ref_ppl = ref_ppl or ppl
        return {
            "dtype": self.dtype,
            "ppl": ppl,
            "delta_ppl_pct": (ppl / ref_ppl - 1) * 100,
            "kl_mean": kl.double().mean().item(),
            "kl_p99": torch.quantile(kl.double(), 0.99).item(),
            "top1_agreement_pct": agree.double().mean().item() * 100,
            "bytes_per_token": self.bytes_per_token,
            "memory_saved_vs_fp16_pct": (1 - self.bytes_per_token / fp16_bytes) * 100,
            "tokens_scored": int(nll.numel()),
        }


def split_windows(token_ids: list[int], windows: int, context: int) -> list[list[int]]:
    if windows * context > len(token_ids):
        raise ValueError(
            f"the text has {len(token_ids)} tokens: not enough for {windows} windows of {context}; "
            "use fewer windows, a shorter context or a longer --text"
        )
    return [token_ids[i * context : (i + 1) * context] for i in range(windows)]


def evaluate(
    model: str,
    text: str,
    dtypes: list[str | KvCacheDtype],
    context: int = 1024,
    windows: int = 8,
    prefix: int = 512,
    chunk: int = 128,
    compute_dtype: str = "float32",
    block_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run the report; returns {"results": [...], "windows", "context", "prefix", "model"}."""
    if not 0 < prefix < context - 1:
        raise ValueError(f"prefix must be in [1, context - 2], got {prefix} with context {context}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    """dtypes: KV specs in text form ('int8', 'int8/int4', 'int4;0=fp16;-1=fp16'), compared
    with the fp32 cache."""
    names = [d.value if isinstance(d, KvCacheDtype) else str(d) for d in dtypes]
    order = [REFERENCE] + [d for d in dict.fromkeys(names) if d != REFERENCE]
    engines = {}
    for d in order:
        cfg = EngineConfig().with_flags(
            dict(
                model=model,
                dtype=compute_dtype,
                **spec_flags(d),
                block_size=block_size,
                kv_cache_num_blocks=windows * blocks_needed(context + 1, block_size),
                max_model_len=context + 1,
                max_num_seqs=windows,
                max_num_batched_tokens=windows * chunk,
                long_prefill_token_threshold=chunk,
                enable_prefix_caching=False,
            )
        )
        engines[d] = LLMEngine(cfg)
    tok = engines[REFERENCE].tokenizer
    wins = split_windows(tok.encode(text), windows, context)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=-1)
    for d in order:
        for i, w in enumerate(wins):
            engines[d].add_request(f"window-{i}", w, params)
    scores = {d: DtypeScore(d, engines[d].pool.bytes_per_token) for d in order}
    targets_all = torch.tensor(wins)
    done = 0
    while engines[REFERENCE].has_unfinished():
        ref = _rows(engines[REFERENCE].step())
        for d in order:
            rows = ref if d == REFERENCE else _rows(engines[d].step())
            if rows.keys() != ref.keys():
                raise RuntimeError(f"the {d} engine fell out of lock-step with the reference")
            for rid, (start, ref_logp) in ref.items():
                start_d, logp = rows[rid]
                if start_d != start or logp.shape != ref_logp.shape:
                    raise RuntimeError(f"the {d} engine fell out of lock-step with the reference")
                # Row r predicts token start + r + 1; score positions >= prefix only.
                skip = max(0, prefix - start)
                if skip >= len(ref_logp):
                    continue
                w = int(rid.rsplit("-", 1)[1])
                targets = targets_all[w, start + skip + 1 : start + len(ref_logp) + 1]
                scores[d].record(ref_logp[skip:], logp[skip:], targets)
        advanced = max((start + len(lp) for start, lp in ref.values()), default=done)
        if progress and advanced > done:
            progress(advanced - done)
            done = advanced
    ref_ppl = scores[REFERENCE].summary(None, 1)["ppl"]
    fp16_bytes = _fp16_bytes(engines[REFERENCE])
    results = [scores[d].summary(ref_ppl, fp16_bytes) for d in order]  # the fp32 reference first
    return {
        "results": results,
        "windows": windows,
        "context": context,
        "prefix": prefix,
        "chunk": chunk,
        "model": model,
        "compute_dtype": compute_dtype,
    }


def _rows(outputs) -> dict[str, tuple[int, torch.Tensor]]:
    """request id -> (first position, log-distribution rows) of one step's outputs."""
    return {
        o.request_id: (o.prompt_logprobs_start, o.prompt_logprob_rows)
        for o in outputs
        if o.prompt_logprob_rows is not None
    }


def _fp16_bytes(engine: LLMEngine) -> int:
    from ferrolm.kv.pool import kv_bytes_per_token

    m = engine.model.config
    return kv_bytes_per_token(FORMATS[KvCacheDtype.FP16], m.num_layers, m.num_kv_heads, m.head_dim)


def format_table(report: dict) -> str:
    head = "| KV dtype | PPL | ΔPPL % | KL mean | KL p99 | top-1 agree % | bytes/token | saved vs fp16 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['dtype']} | {r['ppl']:.4f} | {r['delta_ppl_pct']:+.3f} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | "
            f"{r['top1_agreement_pct']:.2f} | {r['bytes_per_token']:,} | {r['memory_saved_vs_fp16_pct']:.1f}% |"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in report["results"]:
        if r["dtype"] == REFERENCE:
            continue
        ax1.scatter(r["bytes_per_token"], r["kl_mean"], s=40)
        ax1.annotate(
            r["dtype"], (r["bytes_per_token"], r["kl_mean"]), textcoords="offset points", xytext=(5, 3)
        )
        ax2.scatter(r["bytes_per_token"], r["delta_ppl_pct"], s=40)
        ax2.annotate(
            r["dtype"], (r["bytes_per_token"], r["delta_ppl_pct"]), textcoords="offset points", xytext=(5, 3)
        )
    ax1.set_yscale("log")
    ax1.set_xlabel("KV bytes per token (whole model)")
    ax1.set_ylabel("mean KL vs fp32 cache (nats)")
    ax2.set_xlabel("KV bytes per token (whole model)")
    ax2.set_ylabel("Δ perplexity vs fp32 cache (%)")
    fig.suptitle(f"KV cache quality: {report['model']}, {report['windows']} x {report['context']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
