"""Paged attention over the KV pool.

A step's tokens are a flat list (several sequences, each contributing a prefill
chunk or one decode token). The runner builds an AttentionMetadata once per step;
every layer then writes its new K/V into the pool (quantized) and attends over
the sequences' cached K/V read back from the pool (dequantized), the step's own
tokens included, with batched tensor ops and no Python loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ferrolm.kv.pool import KvPool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    ctx_slots: torch.Tensor  # [B, L] slots of each sequence's whole context (padded)
    q_dest: torch.Tensor  # [T] index of each new token in the padded [B * Q] query grid
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend to a key
    num_seqs: int
    max_q: int

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
        B = len(block_tables)
        starts = torch.tensor(start_positions, dtype=torch.long)
        news = torch.tensor(num_new_tokens, dtype=torch.long)
        ctx_lens = starts + news
        max_q = int(news.max())
        max_l = int(ctx_lens.max())
        nblk = max(len(t) for t in block_tables)
        tables = torch.zeros((B, nblk), dtype=torch.long)
        for b, t in enumerate(block_tables):
            tables[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        key_pos = torch.arange(max_l)
        key_valid = key_pos.unsqueeze(0) < ctx_lens.unsqueeze(1)  # [B, L]
        ctx_slots = tables[:, key_pos // block_size] * block_size + key_pos % block_size
        ctx_slots = torch.where(key_valid, ctx_slots, torch.zeros_like(ctx_slots))

        qi = torch.arange(max_q)
        q_valid = qi.unsqueeze(0) < news.unsqueeze(1)  # [B, Q]
        q_pos = starts.unsqueeze(1) + qi.unsqueeze(0)  # [B, Q]
        mask = (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & key_valid.unsqueeze(1)
        # Padding rows attend to key 0 only, so that softmax never sees an empty row.
        mask[:, :, 0] |= ~q_valid
        q_dest = (torch.arange(B).unsqueeze(1) * max_q + qi.unsqueeze(0))[q_valid]
        slot_mapping = ctx_slots.gather(1, q_pos.clamp(max=max_l - 1))[q_valid]
        return cls(
            slot_mapping=slot_mapping.to(device),
            ctx_slots=ctx_slots.to(device),
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
    """q [T, H, D], k/v [T, KVH, D] -> [T, H * D]. Writes k/v into the pool first."""
    T, H, D = q.shape
    pool.write(layer, meta.slot_mapping, k, v)
    keys, values = pool.read(layer, meta.ctx_slots, q.dtype)  # [B, L, KVH, D]
    B, Q = meta.num_seqs, meta.max_q
    qp = q.new_zeros((B * Q, H, D))
    qp[meta.q_dest] = q
    qp = qp.view(B, Q, H, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp,
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=meta.mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(B * Q, H * D)[meta.q_dest]
