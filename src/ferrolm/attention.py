"""Paged attention over the KV pool.

A step's tokens are a flat list (several sequences, each contributing a prefill
chunk or one decode token). The runner builds an AttentionMetadata once per step;
every layer then writes its new K/V into the pool (quantized) and attends over
the sequences' cached blocks read back from the pool, the step's own tokens
included, with batched tensor ops and no Python loop over sequences.

Attention runs in fp32 whatever the compute dtype: the softmax and the sums over
the context stay exact enough, and fp32 matmuls are the fast ones on AVX2 CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ferrolm.kv.pool import KvPool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    block_tables: torch.Tensor  # [B, nblk] each sequence's blocks (padded with block 0)
    q_dest: torch.Tensor  # [T] index of each new token in the padded [B * Q] query grid
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend to a key (L = nblk * block_size)
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
        nblk = max(len(t) for t in block_tables)
        tables = torch.zeros((B, nblk), dtype=torch.long)
        for b, t in enumerate(block_tables):
            tables[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        key_pos = torch.arange(nblk * block_size)
        key_valid = key_pos.unsqueeze(0) < ctx_lens.unsqueeze(1)  # [B, L]

        qi = torch.arange(max_q)
        q_valid = qi.unsqueeze(0) < news.unsqueeze(1)  # [B, Q]
        q_pos = starts.unsqueeze(1) + qi.unsqueeze(0)  # [B, Q]
        mask = (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & key_valid.unsqueeze(1)
        # Padding rows attend to key 0 only, so that softmax never sees an empty row.
        mask[:, :, 0] |= ~q_valid
        q_dest = (torch.arange(B).unsqueeze(1) * max_q + qi.unsqueeze(0))[q_valid]
        pos = q_pos[q_valid]
        seq_of = torch.arange(B).unsqueeze(1).expand(B, max_q)[q_valid]
        slot_mapping = tables[seq_of, pos // block_size] * block_size + pos % block_size
        return cls(
            slot_mapping=slot_mapping.to(device),
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
    B, Q = meta.num_seqs, meta.max_q
    pool.write(layer, meta.slot_mapping, k, v)
    keys, values = pool.gather(layer, meta.block_tables, torch.float32)  # [B, L, KVH, D]
    qp = q.new_zeros((B * Q, H, D), dtype=torch.float32)
    qp[meta.q_dest] = q.float()
    out = F.scaled_dot_product_attention(
        qp.view(B, Q, H, D).transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=meta.mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(B * Q, H * D)[meta.q_dest].to(q.dtype)
