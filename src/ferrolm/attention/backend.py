"""The attention-backend seam.

A backend writes a step's new K/V into the pool in the layer's stored formats and
attends over the paged cache. Models never import one: each attention layer holds
a PagedAttention object (attention/layer.py), the runner picks the backend and
passes it in the step context. The torch backend is the reference for every
format; compiled CPU and CUDA backends plug in here.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ferrolm.attention.metadata import AttentionMetadata
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec


class AttentionBackend(Protocol):
    name: str

    @classmethod
    def supports_device(cls, device: torch.device) -> bool:
        """Whether it runs on tensors of this device."""

    def unsupported(self, spec: KvSpec) -> str | None:
        """Why this backend cannot run `spec` (None: it can)."""

    def write(self, pool: KvPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [tokens, kv_heads, head_dim] (rotated where the format is) in `slots`."""

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        pool: KvPool,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim] (rotated where the keys are) -> [T, heads * head_dim] in
        q's dtype, over each sequence's cached blocks (its new tokens included); with a
        sliding `window`, a query at position p sees keys p - window + 1 .. p only."""
