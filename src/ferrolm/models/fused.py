"""Projections that read the same input, merged into one matrix: q/k/v and gate/up.

One GEMV over the merged rows instead of three (or two) calls saves the per-call cost
(dispatch, a parallel region, x's preparation), which at one sequence is of the order of
the arithmetic. The merged layer owns the storage and the original layers are rebound to
row-slices of it, so nothing is held twice and the HF-named modules still show each
projection's own weight (state dicts, the HF baseline, tests).
"""

from __future__ import annotations

import torch
from torch import nn

from ferrolm.models.quant_linear import Q4Linear, Q4Weight


class FusedLinear:
    """y = x [W_1; W_2; ...]^T, returned as one tensor and split by `sizes` on demand."""

    def __init__(self, merged: nn.Module, sizes: list[int]) -> None:
        self.merged = merged
        self.sizes = sizes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged(x)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.sizes, dim=-1)


def fuse(parts: list[nn.Module]) -> FusedLinear | None:
    """Merge linear layers of one input size; None when they cannot be (mixed kinds)."""
    sizes = [p.out_features for p in parts]
    if all(isinstance(p, Q4Linear) for p in parts):
        q4 = [p.q4 for p in parts]
        merged = Q4Linear(
            Q4Weight(
                torch.cat([w.codes for w in q4]),
                torch.cat([w.scales for w in q4]),
                torch.cat([w.mins for w in q4]),
            )
        )
        offset = 0
        for p, n in zip(parts, sizes):
            m = merged.q4
            p.q4 = Q4Weight(
                m.codes[offset : offset + n], m.scales[offset : offset + n], m.mins[offset : offset + n]
            )
            offset += n
        return FusedLinear(merged, sizes)
    if all(type(p) is nn.Linear for p in parts) and len({p.weight.dtype for p in parts}) == 1:
        has_bias = [p.bias is not None for p in parts]
        if any(has_bias) and not all(has_bias):
            return None
        merged = nn.Linear(parts[0].in_features, sum(sizes), bias=all(has_bias), dtype=parts[0].weight.dtype)
        merged.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        if all(has_bias):
            merged.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        offset = 0
        for p, n in zip(parts, sizes):
            p.weight = nn.Parameter(merged.weight[offset : offset + n], requires_grad=False)
            if all(has_bias):
                p.bias = nn.Parameter(merged.bias[offset : offset + n], requires_grad=False)
            offset += n
        return FusedLinear(merged, sizes)
    return None
