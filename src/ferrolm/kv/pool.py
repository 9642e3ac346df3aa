"""Paged K/V storage for all layers, sized from a byte budget.

Slots are numbered block * block_size + offset. Each layer holds K and V in the
layout its formats ask for (the KV spec may differ per layer and per half):
data [kv_heads, slots, data_dim] in the format's storage dtype (head-major, so a
gathered context is already [kv_heads, seqs, tokens, ...] for batched matmuls),
and for scaled formats scales [kv_heads, slots, groups]. Everything is allocated
once (zeroed) and released with the pool.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ferrolm.kv.dtypes import KvFormat
from ferrolm.kv.spec import KvSpec

GIB = 1 << 30


def kv_bytes_per_token(spec: KvSpec | KvFormat, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Whole-model bytes one token takes in the cache (a format means every layer, both halves)."""
    if isinstance(spec, KvFormat):
        spec = KvSpec.uniform(spec, num_layers)
    return spec.bytes_per_token(num_kv_heads, head_dim)


def num_blocks_for_budget(
    memory_gb: float,
    spec: KvSpec | KvFormat,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> int:
    per_block = kv_bytes_per_token(spec, num_layers, num_kv_heads, head_dim) * block_size
    return int(memory_gb * GIB) // per_block


class HalfCache(NamedTuple):
    """One layer's K (or V): the stored data and scales, and the format that reads them."""

    fmt: KvFormat
    data: torch.Tensor  # [kv_heads, slots, data_dim]
    scale: torch.Tensor | None  # [kv_heads, slots, groups]


class KvView(NamedTuple):
    """Gathered whole blocks of one layer, as stored: data [kv_heads, B, L, data_dim],
    scales [kv_heads, B, L, groups] (None for unscaled formats)."""

    k_fmt: KvFormat
    k: torch.Tensor
    k_scale: torch.Tensor | None
    v_fmt: KvFormat
    v: torch.Tensor
    v_scale: torch.Tensor | None

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
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block; raise memory_gb or num_blocks")
        if isinstance(spec, KvFormat):
            spec = KvSpec.uniform(spec, num_layers)
        if spec.num_layers != num_layers:
            raise ValueError(f"the KV spec has {spec.num_layers} layers, the model {num_layers}")
        spec.check_head_dim(head_dim)
        self.spec = spec
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        # Zeroed once: attention reads whole blocks, and the never-written tail of a
        # block must be finite (it is masked, but 0 * NaN would still be NaN).
        self.keys = [self._half(lk.key, device) for lk in spec.layers]
        self.values = [self._half(lk.value, device) for lk in spec.layers]

    def _half(self, fmt: KvFormat, device) -> HalfCache:
        shape = (self.num_kv_heads, self.num_slots)
        data = torch.zeros((*shape, fmt.data_dim(self.head_dim)), dtype=fmt.storage, device=device)
        scale = None
        if fmt.scaled:
            scale = torch.zeros((*shape, fmt.num_groups(self.head_dim)), dtype=fmt.scale_dtype, device=device)
        return HalfCache(fmt, data, scale)

    @property
    def bytes_per_token(self) -> int:
        return self.spec.bytes_per_token(self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pool holds."""
        return [t for h in (*self.keys, *self.values) for t in (h.data, h.scale) if t is not None]

    def nbytes(self) -> int:
        """Real bytes held by the pool's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v ([tokens, kv_heads, head_dim], already rotated where the format
        is) into `slots` of one layer."""
        for half, x in ((self.keys[layer], k), (self.values[layer], v)):
            q, s = half.fmt.quantize(x.transpose(0, 1))
            # Indexed assignment (index_put_) works for every storage dtype, fp8 included.
            half.data[:, slots] = q
            if s is not None:
                half.scale[:, slots] = s

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

        kh, vh = self.keys[layer], self.values[layer]
        return KvView(kh.fmt, take(kh.data), take(kh.scale), vh.fmt, take(vh.data), take(vh.scale))
