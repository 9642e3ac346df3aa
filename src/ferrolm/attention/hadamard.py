"""Orthonormal Hadamard matrices for rotated KV formats."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).float()


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """H [n, n], symmetric and orthonormal (H @ H = I): x @ H rotates, y @ H rotates back."""
    return _hadamard_cpu(n).to(device)
