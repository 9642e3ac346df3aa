"""KV quality report: perplexity, KL divergence and top-1 agreement per KV dtype.

Each window's first `prefix` tokens are prefilled into the paged cache of the
dtype under test; the rest are fed in chunks of up to `chunk` tokens through the
engine's own attention path, so every scored token attends to keys and values
read back from that dtype's cache, its own chunk included. All dtypes advance in
lock-step, chunk by chunk, so the fp32-cache reference distribution of each
chunk is compared at once and never stored whole. Windows run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ferrolm.config import EngineConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.scheduler import ScheduledSeq
from ferrolm.kv.blocks import blocks_needed
from ferrolm.kv.dtypes import FORMATS, KvCacheDtype

REFERENCE = KvCacheDtype.FP32


@dataclass(eq=False)
class _Window:
    token_ids: list[int]
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


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
    dtypes: list[KvCacheDtype],
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
    order = [REFERENCE] + [d for d in dtypes if d is not REFERENCE]
    engines = {}
    for d in order:
        cfg = EngineConfig().with_flags(
            dict(
                model=model,
                dtype=compute_dtype,
                kv_cache_dtype=d.value,
                block_size=block_size,
                kv_cache_num_blocks=windows * blocks_needed(context, block_size),
                max_model_len=context,
                enable_prefix_caching=False,
            )
        )
        engines[d] = LLMEngine(cfg)
    tok = engines[REFERENCE].tokenizer
    wins = split_windows(tok.encode(text), windows, context)
    seqs = {d: [_Window(list(w)) for w in wins] for d in order}
    for d in order:
        for s in seqs[d]:
            engines[d].blocks.grow(s, context)
    scores = {d: DtypeScore(d.value, engines[d].pool.bytes_per_token) for d in order}

    def run(d: KvCacheDtype, n: int, all_logits: bool) -> torch.Tensor:
        batch = [ScheduledSeq(s, n) for s in seqs[d]]
        logits = engines[d].runner.execute(batch, all_logits=all_logits)
        for s in seqs[d]:
            s.num_computed += n
        return logits

    # The prefix: cached, not scored (chunked the same way, so prefill sees the same path).
    for start in range(0, prefix, chunk):
        n = min(chunk, prefix - start)
        for d in order:
            run(d, n, all_logits=False)
        if progress:
            progress(n)
    # The rest: logits at positions prefix .. context-2 predict tokens prefix+1 .. context-1.
    targets_all = torch.tensor(wins)
    for start in range(prefix, context - 1, chunk):
        n = min(chunk, context - 1 - start)
        targets = targets_all[:, start + 1 : start + 1 + n].reshape(-1)
        ref_logp = run(REFERENCE, n, all_logits=True).log_softmax(-1)
        for d in order:
            logp = ref_logp if d is REFERENCE else run(d, n, all_logits=True).log_softmax(-1)
            scores[d].record(ref_logp, logp, targets)
        if progress:
            progress(n)
    for d in order:
        for s in seqs[d]:
            engines[d].blocks.free(s)
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
        if r["dtype"] == REFERENCE.value:
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
