"""Paged attention over the KV pool.

A step's tokens are a flat list (several sequences, each contributing a prefill
chunk or one decode token). The runner builds an AttentionMetadata once per step;
every layer then writes its new K/V into the pool (quantized) and attends over
the sequences' cached blocks read back from the pool, the step's own tokens
included, with batched tensor ops and no Python loop over sequences.

Attention runs in fp32 whatever the compute dtype: the softmax and the sums over
the context stay exact enough, and fp32 matmuls are the fast ones on AVX2 CPUs.
Per-token scales of the quantized formats are folded into the scores and the
attention weights instead of materialising dequantized K and V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferrolm.kv.pool import KvPool


@dataclass
class AttentionGroup:
    """Sequences attended together on one padded [B, Q] query grid."""

    token_index: torch.Tensor  # [Tg] positions of the group's new tokens in the step's flat list
    block_tables: torch.Tensor  # [B, nblk] each sequence's blocks (padded with block 0)
    q_dest: torch.Tensor  # [Tg] index of each new token in the padded [B * Q] query grid
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend to a key (L = nblk * block_size)
    num_seqs: int
    max_q: int


@dataclass
class AttentionMetadata:
    """Built once per step. Decodes (one new token) and prefill chunks form separate
    groups, so that one long chunk does not pad every decode to its length."""

    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        start_positions: list[int],
        num_new_tokens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Sequence b computes tokens start_positions[b] .. + num_new_tokens[b] - 1."""
        offsets = [0]
        for n in num_new_tokens:
            offsets.append(offsets[-1] + n)
        slots = []
        for table, start, n in zip(block_tables, start_positions, num_new_tokens):
            pos = torch.arange(start, start + n)
            slots.append(
                torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
            )
        groups = []
        for members in (
            [b for b, n in enumerate(num_new_tokens) if n == 1],
            [b for b, n in enumerate(num_new_tokens) if n > 1],
        ):
            if members:
                groups.append(
                    _group(
                        members, block_tables, start_positions, num_new_tokens, offsets, block_size, device
                    )
                )
        return cls(slot_mapping=torch.cat(slots).to(device), groups=groups)


def _group(
    members, block_tables, start_positions, num_new_tokens, offsets, block_size, device
) -> AttentionGroup:
    B = len(members)
    starts = torch.tensor([start_positions[b] for b in members], dtype=torch.long)
    news = torch.tensor([num_new_tokens[b] for b in members], dtype=torch.long)
    ctx_lens = starts + news
    max_q = int(news.max())
    nblk = max(len(block_tables[b]) for b in members)
    tables = torch.zeros((B, nblk), dtype=torch.long)
    for i, b in enumerate(members):
        tables[i, : len(block_tables[b])] = torch.tensor(block_tables[b], dtype=torch.long)
    key_pos = torch.arange(nblk * block_size)
    key_valid = key_pos.unsqueeze(0) < ctx_lens.unsqueeze(1)  # [B, L]
    qi = torch.arange(max_q)
    q_valid = qi.unsqueeze(0) < news.unsqueeze(1)  # [B, Q]
    q_pos = starts.unsqueeze(1) + qi.unsqueeze(0)  # [B, Q]
    mask = (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & key_valid.unsqueeze(1)
    # Padding rows attend to key 0 only, so that softmax never sees an empty row.
    mask[:, :, 0] |= ~q_valid
    token_index = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in members])
    q_dest = (torch.arange(B).unsqueeze(1) * max_q + qi.unsqueeze(0))[q_valid]
    return AttentionGroup(
        token_index=token_index.to(device),
        block_tables=tables.to(device),
        q_dest=q_dest.to(device),
        mask=mask.unsqueeze(1).to(device),
        num_seqs=B,
        max_q=max_q,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    pool: KvPool,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] -> [T, H * D] in q's dtype. Writes k/v into the pool first."""
    T, H, D = q.shape
    pool.write(layer, meta.slot_mapping, k, v)
    if len(meta.groups) == 1 and meta.groups[0].token_index.numel() == T:
        return _attend(q, layer, pool, meta.groups[0], scale)
    out = q.new_empty((T, H * D))
    for g in meta.groups:
        out[g.token_index] = _attend(q[g.token_index], layer, pool, g, scale)
    return out


def _attend(q: torch.Tensor, layer: int, pool: KvPool, g: AttentionGroup, scale: float) -> torch.Tensor:
    """One group: q [Tg, H, D] in the group's token order -> [Tg, H * D].

    Batched over (kv head, sequence) with contiguous operands, in fp32. Scales are
    folded in rather than dequantizing K and V: q . (s_k k_q) = s_k (q . k_q) scales the
    scores, sum_j p_j (s_v,j v_q,j) = sum_j (p_j s_v,j) v_q,j scales the weights; K and V
    are only cast, which on a bandwidth-bound CPU saves a full pass over the context."""
    _, H, D = q.shape
    B, Q = g.num_seqs, g.max_q
    kv = pool.gather(layer, g.block_tables)  # k, v: [KVH, B, L, D]
    KVH, L = kv.k.shape[0], kv.k.shape[2]
    G = H // KVH
    qp = q.new_zeros((B * Q, H, D), dtype=torch.float32)
    qp[g.q_dest] = q.float()
    # [B, Q, KVH, G, D] -> [KVH, B, G * Q, D]: query head h reads kv head h // G.
    qp = qp.view(B, Q, KVH, G, D).permute(2, 0, 3, 1, 4).reshape(KVH, B, G * Q, D)
    scores = torch.matmul(qp, kv.k.float().transpose(-1, -2))  # [KVH, B, G * Q, L]
    factor = kv.k_scale.unsqueeze(2) * scale if kv.k_scale is not None else scale
    scores = (scores * factor).view(KVH, B, G, Q, L).masked_fill(~g.mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(KVH, B, G * Q, L)
    if kv.v_scale is not None:
        probs = probs * kv.v_scale.unsqueeze(2)
    out = torch.matmul(probs, kv.v.float())  # [KVH, B, G * Q, D]
    out = out.view(KVH, B, G, Q, D).permute(1, 3, 0, 2, 4).reshape(B * Q, H * D)
    return out[g.q_dest].to(q.dtype)
