"""Paged K/V storage for all layers, sized from a byte budget.

Slots are numbered block * block_size + offset. Each layer holds K and V in the
layout its formats ask for (the KV spec may differ per layer and per half):
data [kv_heads, slots, data_dim] in the format's storage dtype (head-major, so a
gathered context is already [kv_heads, seqs, tokens, ...] for batched matmuls),
and for scaled formats scales [kv_heads, slots, groups]. Everything is allocated
once (zeroed; large tensors on 2 MiB pages, kv/host_memory.py) and released with the pool.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ferrolm.kv.dtypes import FORMATS, KvCacheDtype, KvFormat
from ferrolm.kv.groups import KvGroups
from ferrolm.kv.host_memory import zeros
from ferrolm.kv.spec import KvSpec

GIB = 1 << 30
FP32_VIEW = FORMATS[KvCacheDtype.FP32]  # how already-dequantized gathered values are described


def kv_bytes_per_token(
    spec: KvSpec | KvFormat, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int = 16
) -> int:
    """Whole-model bytes one token takes in the cache (a format means every layer, both halves)."""
    if isinstance(spec, KvFormat):
        spec = KvSpec.uniform(spec, num_layers)
    return spec.bytes_per_token(num_kv_heads, head_dim, block_size)


def staging_bytes(spec: KvSpec, num_kv_heads: int, head_dim: int, block_size: int, rows: int) -> int:
    """fp16 staging of blocks being filled, for the layers' per-channel halves."""
    halves = sum(f.per_channel_block for lk in spec.layers for f in (lk.key, lk.value))
    return halves * num_kv_heads * rows * block_size * head_dim * 2


def num_blocks_for_budget(
    memory_gb: float,
    spec: KvSpec | KvFormat,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    staging_rows: int = 0,
    layers_per_block: int | None = None,
) -> int:
    """Blocks of `layers_per_block` layers (a KV group's page; default all) in the budget."""
    per_block = kv_bytes_per_token(spec, num_layers, num_kv_heads, head_dim, block_size) * block_size
    per_block = per_block * (layers_per_block or num_layers) // num_layers
    staged = (
        staging_bytes(spec, num_kv_heads, head_dim, block_size, staging_rows)
        if isinstance(spec, KvSpec)
        else 0
    )
    return max(0, int(memory_gb * GIB) - staged) // per_block


class HalfCache(NamedTuple):
    """One layer's K (or V): the stored data and scales, and the format that reads them."""

    fmt: KvFormat
    data: torch.Tensor  # [kv_heads, slots, data_dim]
    scale: torch.Tensor | None  # [kv_heads, slots, groups]; per-channel: [kv_heads, blocks, 2, D]
    staging: torch.Tensor | None = None  # per-channel: [kv_heads, rows, block_size, D] fp16


class KvView(NamedTuple):
    """Gathered whole blocks of one layer, as stored: data [kv_heads, B, L, data_dim],
    scales [kv_heads, B, L, groups] (None for unscaled formats)."""

    k_fmt: KvFormat
    k: torch.Tensor
    k_scale: torch.Tensor | None
    v_fmt: KvFormat
    v: torch.Tensor
    v_scale: torch.Tensor | None
    # Per-channel halves: the fp16 staging rows of the blocks written in this step, read
    # instead of the codes by queries inside the same block (see _gather_staged).
    k_stage: torch.Tensor | None = None
    v_stage: torch.Tensor | None = None

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K and V [kv_heads, B, L, head_dim] (in the stored, possibly rotated, basis)."""
        return self.k_fmt.dequantize(self.k, self.k_scale), self.v_fmt.dequantize(self.v, self.v_scale)


class KvPool:
    def __init__(
        self,
        spec: KvSpec | KvFormat,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        staging_rows: int = 0,
        groups: KvGroups | None = None,
    ) -> None:
        """groups: layers sharing block tables (kv/groups.py); a block then holds one
        group's layers, and layer k of every group is stored in the same tensors."""
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block; raise memory_gb or num_blocks")
        if isinstance(spec, KvFormat):
            spec = KvSpec.uniform(spec, num_layers)
        if spec.num_layers != num_layers:
            raise ValueError(f"the KV spec has {spec.num_layers} layers, the model {num_layers}")
        spec.check_head_dim(head_dim, block_size)
        self.spec = spec
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        # Per-channel formats quantize a block once it is full; until then its tokens wait
        # in fp16 staging rows, one per block being filled, shared by all layers' halves.
        self.staging_rows = staging_rows if spec.staged else 0
        if spec.staged and staging_rows < 1:
            raise ValueError("a per-channel KV format needs staging rows for blocks being filled")
        self.row_of = torch.full((num_blocks,), -1, dtype=torch.long)
        self.complete = torch.zeros(num_blocks, dtype=torch.bool)
        self._free_rows = list(range(self.staging_rows - 1, -1, -1))
        # Zeroed once: attention reads whole blocks, and the never-written tail of a
        # block must be finite (it is masked, but 0 * NaN would still be NaN).
        self.groups = groups or KvGroups.single(num_layers)
        slots = [spec.layers[layer] for layer in self.groups.slot_layers()]
        slot_keys = [self._half(lk.key, device) for lk in slots]
        slot_values = [self._half(lk.value, device) for lk in slots]
        self.keys = [slot_keys[k] for k in self.groups.layer_slot]
        self.values = [slot_values[k] for k in self.groups.layer_slot]

    def _half(self, fmt: KvFormat, device) -> HalfCache:
        H, D = self.num_kv_heads, self.head_dim
        data = zeros((H, self.num_slots, fmt.data_dim(D)), fmt.storage, device)
        if fmt.per_channel_block:
            scale = zeros((H, self.num_blocks, 2, D), fmt.scale_dtype, device)
            staging = zeros((H, self.staging_rows, self.block_size, D), torch.float16, device)
            return HalfCache(fmt, data, scale, staging)
        scale = None
        if fmt.scaled:
            scale = zeros((H, self.num_slots, fmt.num_groups(D)), fmt.scale_dtype, device)
        return HalfCache(fmt, data, scale)

    @property
    def bytes_per_token(self) -> int:
        """Whole-model bytes of one token kept by every layer."""
        return self.spec.bytes_per_token(self.num_kv_heads, self.head_dim, self.block_size)

    def _halves(self) -> list[HalfCache]:
        """Each stored half once (layers of one slot share theirs)."""
        return list({id(h): h for h in (*self.keys, *self.values)}.values())

    def staging_nbytes(self) -> int:
        return sum(h.staging.numel() * 2 for h in self._halves() if h.staging is not None)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds while no window has dropped any (every group keeps all)."""
        return self.num_blocks // self.groups.num_groups * self.block_size

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block (of one group's layers), staging rows aside."""
        halves = self._halves()
        held = sum(t.numel() * t.element_size() for h in halves for t in (h.data, h.scale) if t is not None)
        return held // self.num_blocks

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pool holds (staging rows included)."""
        return [t for h in self._halves() for t in h[1:] if t is not None]

    def nbytes(self) -> int:
        """Real bytes held by the pool's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v ([tokens, kv_heads, head_dim], already rotated where the format
        is) into `slots` of one layer."""
        for half, x in ((self.keys[layer], k), (self.values[layer], v)):
            if half.fmt.per_channel_block:
                self.write_staged(half, slots, x.transpose(0, 1))
                continue
            q, s = half.fmt.quantize(x.transpose(0, 1))
            # Indexed assignment (index_put_) works for every storage dtype, fp8 included.
            half.data[:, slots] = q
            if s is not None:
                half.scale[:, slots] = s

    def write_staged(self, half: HalfCache, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Per-channel half: tokens into their blocks' staging rows; blocks whose last slot
        is written are quantized from their row (and read quantized from then on)."""
        bs = self.block_size
        blocks, offsets = slots // bs, slots % bs
        self.complete[blocks[offsets == 0]] = False  # a block (re)started
        need = blocks.unique()
        missing = need[self.row_of[need] < 0]
        if len(missing) > len(self._free_rows):
            raise RuntimeError("out of KV staging rows for blocks being filled")
        if len(missing):
            self.row_of[missing] = torch.tensor(self._free_rows[-len(missing) :], dtype=torch.long)
            del self._free_rows[-len(missing) :]
        rows = self.row_of[blocks]
        half.staging[:, rows, offsets] = x.to(torch.float16)
        done = blocks[offsets == bs - 1]
        if len(done):
            q, s = half.fmt.quantize_block(half.staging[:, self.row_of[done]])  # [H, n, bs, ...]
            slot_ids = (done.unsqueeze(1) * bs + torch.arange(bs)).reshape(-1)
            half.data[:, slot_ids] = q.reshape(q.shape[0], -1, q.shape[-1])
            half.scale[:, done] = s
            self.complete[done] = True

    def retain_staging(self, blocks_being_filled: set[int]) -> None:
        """After a step: free the staging rows of every block not still being filled (full,
        freed or preempted ones). Called by the engine once per step."""
        if not self.staging_rows:
            return
        for b in (self.row_of >= 0).nonzero().flatten().tolist():
            if b not in blocks_being_filled or bool(self.complete[b]):
                self._free_rows.append(int(self.row_of[b]))
                self.row_of[b] = -1

    def _gather_staged(self, half: HalfCache, block_tables: torch.Tensor):
        """Per-channel half -> (the codes dequantized, fp32 [kv_heads, B, L, D]; the staging
        rows of blocks that have one, fp32, zeros elsewhere). A query reads its own block
        from staging (its tokens so far, in fp16) and every earlier block, which is full,
        from the codes, whether the block was completed in this step or long ago: so the
        numbers do not depend on how a prompt was chunked, batched or recomputed."""
        H, (B, nblk) = self.num_kv_heads, block_tables.shape
        ids = block_tables.reshape(-1)
        bs, D = self.block_size, self.head_dim
        data = torch.index_select(half.data.view(H, self.num_blocks, -1), 1, ids)
        data = data.view(H, B, nblk, bs, -1)
        scale = torch.index_select(half.scale, 1, ids).view(H, B, nblk, 2, D)
        codes = half.fmt.dequantize_block(data, scale).view(H, B, nblk * bs, D)
        rows = self.row_of[block_tables]
        staged = half.staging[:, rows.clamp(min=0)].float()  # [H, B, nblk, bs, D]
        staged = staged * (rows >= 0).view(1, B, nblk, 1, 1)
        return codes, staged.view(H, B, nblk * bs, D)

    def gather(self, layer: int, block_tables: torch.Tensor) -> KvView:
        """The K/V of whole blocks, as stored: [B, nblk] block ids -> data
        [kv_heads, B, nblk * block_size, data_dim] and scales [kv_heads, B, L, groups].
        Blocks are copied with index_select, a memcpy per block."""
        B, nblk = block_tables.shape
        ids = block_tables.reshape(-1)
        H, L = self.num_kv_heads, nblk * self.block_size

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            width = t.shape[-1]
            out = torch.index_select(t.view(H, self.num_blocks, -1), 1, ids)
            return out.view(H, B, L, width)

        def half(h: HalfCache):
            if h.fmt.per_channel_block:  # handed out dequantized, as an fp32 "format"
                codes, staged = self._gather_staged(h, block_tables)
                return (FP32_VIEW, codes, None), staged
            return (h.fmt, take(h.data), take(h.scale)), None

        (k, k_stage), (v, v_stage) = half(self.keys[layer]), half(self.values[layer])
        return KvView(*k, *v, k_stage, v_stage)
