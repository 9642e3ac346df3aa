"""Chooses each sequence's next token from its logits.

Greedy rows take the argmax. Sampled rows apply penalties, temperature, top-k,
top-p and min-p, then draw with the sequence's own torch.Generator when it has a
seed, so a seeded request draws the same tokens whatever else shares the batch.

Numerics: every accepted parameter value is safe. Penalised logits are clamped to
+-LOGIT_LIMIT (a repetition penalty of 1e-300 would make them inf), and temperatures
below MIN_TEMPERATURE are greedy, so logits / temperature stays finite in fp32.
"""

from __future__ import annotations

import torch

from ferrolm.engine.sequence import Sequence
from ferrolm.models.layer_ops import argmax_rows

LOGIT_LIMIT = 1e30  # / MIN_TEMPERATURE (1e-5) = 1e35, still finite in fp32


def _has_penalties(seq: Sequence) -> bool:
    p = seq.params
    return bool(
        p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.logit_bias
    )


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Penalties for one row ([V]); returns the row unchanged when none is set."""
    p = seq.params
    if not _has_penalties(seq):
        return logits
    vocab = logits.shape[-1]
    logits = logits.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device).clamp(max=vocab - 1)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if seq.output_ids and (p.presence_penalty or p.frequency_penalty):
        out = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device).clamp(max=vocab - 1)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits.nan_to_num(nan=float("-inf")).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask tokens outside top-k / top-p / min-p with -inf (one row)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [B, V] fp32, one row per sequence -> (token per row, top-N logprobs per row).
    Raises if a row cannot be sampled (e.g. no finite logit); the engine then samples
    row by row to finish only the sequence that failed."""
    # Only rows with penalties are rewritten (a batch of 64 plain rows used to be copied
    # row by row into a new [B, V] tensor every step); one host sync for all argmaxes.
    penalized = {i: apply_penalties(logits[i], s) for i, s in enumerate(seqs) if _has_penalties(s)}
    if penalized:
        logits = logits.clone()
        for i, row in penalized.items():
            logits[i] = row
    greedy_ids = argmax_rows(logits).tolist()
    tokens: list[int] = []
    logprobs: list[dict[int, float] | None] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            token = greedy_ids[i]
        else:
            row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            # The request's generator is a CPU one (seeded, reproducible on any device).
            token = int(torch.multinomial(row.softmax(-1).cpu(), 1, generator=seq.generator))
        tokens.append(token)
        if p.logprobs is not None:
            lp = logits[i].log_softmax(-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs > 0 else None
            entry = {token: float(lp[token])}
            if top is not None:
                entry.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs
