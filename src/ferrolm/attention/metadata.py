"""Per-step attention metadata, built once by the runner and used by every layer.

A step's tokens are a flat list (several sequences, each contributing a prefill
chunk or one decode token). Built eagerly, with a few tensor ops: the slot each new
token's K/V goes to, and the flat description compiled backends walk (int32 block
tables, each sequence's first token in the flat list, its context length after the
step). Built on first use, for the torch reference: groups of sequences attended
together on padded query grids (decodes apart from prefill chunks, so one long chunk
does not pad every decode to its length).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionGroup:
    """Sequences attended together on one padded [B, Q] query grid."""

    token_index: torch.Tensor  # [Tg] positions of the group's new tokens in the step's flat list
    block_tables: torch.Tensor  # [B, nblk] each sequence's blocks (padded with block 0)
    q_dest: torch.Tensor  # [Tg] index of each new token in the padded [B * Q] query grid
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend to a key (L = nblk * block_size)
    same_block: torch.Tensor  # [B, 1, Q, L] True where a key sits in the query's own block
    num_seqs: int
    max_q: int
    q_pos: torch.Tensor | None = None  # [B, 1, Q, 1] each query's position (padding rows: -1)

    def window_mask(self, window: int) -> torch.Tensor:
        """mask, and each query sees only its last `window` keys (padding rows keep key 0)."""
        L = self.mask.shape[-1]
        key_pos = torch.arange(L, device=self.mask.device)
        q_pos = self.q_pos
        return self.mask & ((key_pos > q_pos - window) | (q_pos < 0))


class AttentionMetadata:
    """Sequence b computes tokens start_positions[b] .. + num_new_tokens[b] - 1."""

    def __init__(
        self,
        block_tables: list[list[int]],
        start_positions: list[int],
        num_new_tokens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.num_new = num_new_tokens
        self.starts = start_positions
        B = len(block_tables)
        # A decode step (one new token per sequence) in plain lists: a handful of tensors
        # from lists instead of ~25 tensor ops (a one-sequence step's metadata: ~200 us).
        self._decode = all(n == 1 for n in num_new_tokens)
        if self._decode:
            q_start = torch.arange(B + 1, dtype=torch.int32)
            ctx_len = torch.tensor([s + 1 for s in start_positions], dtype=torch.int32)
        else:
            news = torch.tensor(num_new_tokens, dtype=torch.int32)
            starts = torch.tensor(start_positions, dtype=torch.int32)
            q_start = torch.zeros(B + 1, dtype=torch.int32)
            torch.cumsum(news, 0, out=q_start[1:])
            seq_of = torch.repeat_interleave(torch.arange(B), news.long())  # [T]
            pos = starts.long()[seq_of] + torch.arange(len(seq_of)) - q_start.long()[seq_of]
            self._token_block = (seq_of, pos // block_size, pos % block_size)
            ctx_len = starts + news
        self._set_tables(block_tables)
        self.q_start = q_start.to(device)  # [B + 1] int32: sequence b's tokens are q_start[b]..[b+1]
        self.ctx_len = ctx_len.to(device)  # [B] int32: keys each sequence has after the step
        self.max_q = max(num_new_tokens)  # the most new tokens of one sequence
        self.max_context = max(s + n for s, n in zip(start_positions, num_new_tokens))

    def _set_tables(self, block_tables: list[list[int]]) -> None:
        self._tables = block_tables
        # A few tensor ops whatever the batch: one flat copy of all tables, placed row by row
        # by a mask (row-major, as the chain); a copy per sequence took ~20 us each.
        lens = torch.tensor(list(map(len, block_tables)), dtype=torch.int64)
        nblk = int(lens.max())
        tables = torch.zeros((len(block_tables), nblk), dtype=torch.int32)
        flat = torch.tensor(list(itertools.chain.from_iterable(block_tables)), dtype=torch.int32)
        tables[torch.arange(nblk) < lens[:, None]] = flat
        if self._decode:  # each sequence's one slot
            bs = self.block_size
            slots = [t[s // bs] * bs + s % bs for t, s in zip(block_tables, self.starts)]
            self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.device)
        else:
            seq_of, block_index, offset = self._token_block
            blocks = tables.long()[seq_of, block_index]
            self.slot_mapping = (blocks * self.block_size + offset).to(self.device)
        self.block_tables = tables.to(self.device)  # [B, nblk] int32, padded with block 0

    def with_tables(self, block_tables: list[list[int]]) -> AttentionMetadata:
        """The same step over another KV group's block tables (kv/groups.py)."""
        meta = copy.copy(self)
        meta.__dict__.pop("groups", None)  # the torch reference's grids hold the tables
        meta._set_tables(block_tables)
        return meta

    @classmethod
    def static_decode(
        cls,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        q_start: torch.Tensor,
        ctx_len: torch.Tensor,
        block_size: int,
        max_context: int,
    ) -> AttentionMetadata:
        """Decode metadata over static buffers (CUDA graphs: engine/cuda_graphs.py): the
        tensors' shapes are fixed, their values change between replays. Sequences past the
        step's batch have no new token (q_start repeats) and store nothing (slot -1).
        Backends must choose launches from shapes and max_context (the buffers' capacity)
        alone; the torch reference's groups do not apply."""
        meta = cls.__new__(cls)
        meta.block_size = block_size
        meta.device = slot_mapping.device
        meta.num_new = meta.starts = meta._tables = None
        meta.slot_mapping, meta.block_tables = slot_mapping, block_tables
        meta.q_start, meta.ctx_len = q_start, ctx_len
        meta.max_q, meta.max_context = 1, max_context
        return meta

    @classmethod
    def build(
        cls, block_tables, start_positions, num_new_tokens, block_size, device="cpu"
    ) -> AttentionMetadata:
        return cls(block_tables, start_positions, num_new_tokens, block_size, device)

    @cached_property
    def groups(self) -> list[AttentionGroup]:
        """Padded query grids for the torch reference (decodes, then prefill chunks)."""
        news = self.num_new
        offsets = [0]
        for n in news:
            offsets.append(offsets[-1] + n)
        groups = []
        for members in ([b for b, n in enumerate(news) if n == 1], [b for b, n in enumerate(news) if n > 1]):
            if members:
                groups.append(
                    _group(members, self._tables, self.starts, news, offsets, self.block_size, self.device)
                )
        return groups


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
    same_block = (key_pos // block_size).view(1, 1, -1) == (q_pos // block_size).unsqueeze(-1)
    # Padding rows attend to key 0 only, so that softmax never sees an empty row.
    mask[:, :, 0] |= ~q_valid
    token_index = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in members])
    q_dest = (torch.arange(B).unsqueeze(1) * max_q + qi.unsqueeze(0))[q_valid]
    q_pos_or_pad = torch.where(q_valid, q_pos, torch.full_like(q_pos, -1))
    return AttentionGroup(
        q_pos=q_pos_or_pad.view(B, 1, max_q, 1).to(device),
        token_index=token_index.to(device),
        block_tables=tables.to(device),
        q_dest=q_dest.to(device),
        mask=mask.unsqueeze(1).to(device),
        same_block=same_block.unsqueeze(1).to(device),
        num_seqs=B,
        max_q=max_q,
    )
