"""Paged K/V storage for all layers, sized from a byte budget.

Slots are numbered block * block_size + offset. K and V live in one tensor each,
[layers, kv_heads, slots, head_dim] in the format's storage dtype (head-major, so a
gathered context is already [kv_heads, seqs, tokens, head_dim] for batched matmuls),
plus one scale tensor each ([layers, kv_heads, slots], fp16) for scaled formats.
Everything is allocated once (zeroed) and released with the pool.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ferrolm.kv.dtypes import KvFormat

GIB = 1 << 30


def kv_bytes_per_token(fmt: KvFormat, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Whole-model bytes one token takes in the cache: layers x (K, V) x heads x head bytes."""
    return num_layers * 2 * num_kv_heads * fmt.bytes_per_head(head_dim)


def num_blocks_for_budget(
    memory_gb: float, fmt: KvFormat, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int
) -> int:
    per_block = kv_bytes_per_token(fmt, num_layers, num_kv_heads, head_dim) * block_size
    return int(memory_gb * GIB) // per_block


class KvPool:
    def __init__(
        self,
        fmt: KvFormat,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block; raise memory_gb or num_blocks")
        self.fmt = fmt
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        shape = (num_layers, num_kv_heads, self.num_slots, head_dim)
        # Zeroed once: attention reads whole blocks, and the never-written tail of a
        # block must be finite (it is masked, but 0 * NaN would still be NaN).
        self.k = torch.zeros(shape, dtype=fmt.storage, device=device)
        self.v = torch.zeros(shape, dtype=fmt.storage, device=device)
        if fmt.scaled:
            sshape = shape[:-1]
            self.k_scale = torch.zeros(sshape, dtype=fmt.scale_dtype, device=device)
            self.v_scale = torch.zeros(sshape, dtype=fmt.scale_dtype, device=device)
        else:
            self.k_scale = self.v_scale = None

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.fmt, self.num_layers, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots

    def nbytes(self) -> int:
        """Real bytes held by the pool's tensors."""
        tensors = [self.k, self.v, self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v ([tokens, kv_heads, head_dim]) into `slots` of one layer."""
        kq, ks = self.fmt.quantize(k.transpose(0, 1))
        vq, vs = self.fmt.quantize(v.transpose(0, 1))
        # Indexed assignment (index_put_) works for every storage dtype, fp8 included.
        self.k[layer][:, slots] = kq
        self.v[layer][:, slots] = vq
        if ks is not None:
            self.k_scale[layer][:, slots] = ks
            self.v_scale[layer][:, slots] = vs

    def gather(self, layer: int, block_tables: torch.Tensor) -> KvView:
        """The K/V of whole blocks, as stored: [B, nblk] block ids -> [kv_heads, B,
        nblk * block_size, head_dim] (widened to a float dtype if the format has a fast
        path) and fp32 scales [kv_heads, B, L] with the widening factor folded in (None
        for unscaled formats). Blocks are copied with index_select, a memcpy per block."""
        B, nblk = block_tables.shape
        ids = block_tables.reshape(-1)
        H, L = self.num_kv_heads, nblk * self.block_size
        fmt = self.fmt

        def data(t: torch.Tensor) -> torch.Tensor:
            out = torch.index_select(t[layer].view(H, self.num_blocks, -1), 1, ids).view(
                H, B, L, self.head_dim
            )
            return fmt.widen(out) if fmt.widen is not None else out

        def scale(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            s = torch.index_select(t[layer].view(H, self.num_blocks, -1), 1, ids).view(H, B, L).float()
            return s * fmt.widen_factor if fmt.widen_factor != 1.0 else s

        return KvView(data(self.k), scale(self.k_scale), data(self.v), scale(self.v_scale))


class KvView(NamedTuple):
    """Gathered K/V: k * k_scale[..., None] (and v alike) are the dequantized values."""

    k: torch.Tensor
    k_scale: torch.Tensor | None
    v: torch.Tensor
    v_scale: torch.Tensor | None

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        def deq(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
            return x.float() if s is None else x.float() * s.unsqueeze(-1)

        return deq(self.k, self.k_scale), deq(self.v, self.v_scale)
