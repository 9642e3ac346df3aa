"""PagedAttention: what a model's attention layer holds instead of a kernel.

It applies the layer's rotation (for formats stored in a Hadamard basis: keys,
values and queries are rotated alike, so q . k is unchanged, and the output is
rotated back when the values are), then hands the write and the attention to the
step's backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ferrolm.attention.backend import AttentionBackend
from ferrolm.attention.hadamard import fwht
from ferrolm.attention.metadata import AttentionMetadata
from ferrolm.kv.pool import KvPool


@dataclass
class StepContext:
    """What every layer of one model step shares: the cache, its backend, the metadata, and
    the compiled layer loop over this cache where one applies (models/decoder_plan.py)."""

    pool: KvPool
    backend: AttentionBackend
    meta: AttentionMetadata
    plan: object | None = None
    group_metas: list[AttentionMetadata] | None = None  # per KV group, where there are several

    def meta_for(self, layer: int) -> AttentionMetadata:
        """The metadata over the block tables of the layer's KV group."""
        if self.group_metas is None:
            return self.meta
        return self.group_metas[self.pool.groups.layer_group[layer]]


class PagedAttention:
    def __init__(self, layer: int, scale: float, window: int | None = None) -> None:
        self.layer = layer
        self.scale = scale
        self.window = window  # sliding window (keys a query sees, its own included); None: all

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads * D] in q's dtype."""
        lk = ctx.pool.spec.layers[self.layer]
        dtype = q.dtype
        # Backends that rotate inside their kernels (`rotates`) get the vectors as they are.
        rotate_here = not getattr(ctx.backend, "rotates", False)
        if rotate_here and (lk.key.rotated or lk.value.rotated):
            # Rotations run in fp32 and stay there: quantize, the backend's scores and its
            # output are fp32 anyway.
            q = q.float()
            if lk.key.rotated:
                q, k = fwht(q), fwht(k)
            if lk.value.rotated:
                v = fwht(v)
        meta = ctx.meta_for(self.layer)
        ctx.backend.write(ctx.pool, self.layer, meta.slot_mapping, k, v)
        out = ctx.backend.attend(q, self.layer, ctx.pool, meta, self.scale, self.window)
        if rotate_here and lk.value.rotated:  # sum_j p_j (v_j H) = (sum_j p_j v_j) H
            T, HD = out.shape
            D = q.shape[-1]
            out = fwht(out.view(T, HD // D, D)).view(T, HD)
        return out.to(dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    pool: KvPool,
    meta: AttentionMetadata,
    scale: float,
    backend: AttentionBackend | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One layer's attention as a function (tests, tools)."""
    from ferrolm.attention import select_backend

    ctx = StepContext(pool, backend or select_backend("auto", pool.spec, q.device), meta)
    return PagedAttention(layer, scale, window)(q, k, v, ctx)
