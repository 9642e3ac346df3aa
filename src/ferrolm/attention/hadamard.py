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


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(n) along the last dim, in fp32, by the fast Walsh-Hadamard butterflies:
    log2(n) stages of (a + b, a - b) on pairs h apart (h = 1, 2, 4, ...), then one multiply
    by fp32(1 / sqrt(n)). The compiled kernels run the very same operations in the same
    order, so both backends store identical bytes."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size, got {n}")
    lead = x.shape[:-1]
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        v = y.view(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / n**0.5)).view(*lead, n)
