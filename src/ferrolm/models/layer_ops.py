"""The small per-layer ops of a decoder step: residual add + RMSNorm, RoPE in place, SwiGLU.

Compiled for CPU tensors where the kernels build (kernels/layer_ops.cpp) and as Triton
kernels for CUDA tensors (kernels/triton_ops.py): each call replaces 3-12 eager torch
ops, whose dispatch (CPU) or launch count (GPU) outweighed their arithmetic at small
batches. The torch versions below are the reference and the fallback; all compute in fp32.
"""

from __future__ import annotations

import functools

import torch

from ferrolm.kernels import build


@functools.cache
def _triton_ops():
    """kernels/triton_ops.py, or None where triton is missing."""
    try:
        from ferrolm.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_ops() is not None


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    if delta is not None:
        x.add_(delta.reshape(x.shape).float())
    return (weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))).to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """x (the fp32 residual stream [T, H]) += delta in place; returns RMSNorm(x) * weight in
    out_dtype (fp32 or bf16)."""
    if _on_gpu(x) and x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == torch.float32:
        return _triton_ops().add_rms_norm(x, delta, weight, eps, out_dtype)
    if (
        x.is_cpu
        and build.load()
        and out_dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == torch.float32
    ):
        return torch.ops.ferrolm_cpu.add_rms_norm(x, delta, weight, eps, out_dtype == torch.bfloat16)
    return add_rms_norm_reference(x, delta, weight, eps, out_dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.view(-1, 1, x.shape[-1]), sin.view(-1, 1, x.shape[-1])
    x.copy_((x.float() * cos + rotated.float() * sin).to(x.dtype))
    return x


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in place: x [T, heads, D] (fp32 or bf16; contiguous on a CPU, any
    token and head strides on CUDA), cos/sin fp32 [T, D]."""
    if _on_gpu(x) and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous():
        return _triton_ops().rope_(x, cos, sin)
    if x.is_cpu and build.load() and x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16):
        torch.ops.ferrolm_cpu.rope_(x, cos, sin)
        return x
    return rope_reference(x, cos, sin)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up) -> silu(gate) * up [T, I], in gate_up's dtype."""
    if _on_gpu(gate_up) and gate_up.dim() == 2 and gate_up.stride(-1) == 1:
        return _triton_ops().silu_mul(gate_up)
    if (
        gate_up.is_cpu
        and build.load()
        and gate_up.dtype in (torch.float32, torch.bfloat16)
        and gate_up.dim() == 2
    ):
        return torch.ops.ferrolm_cpu.silu_mul(gate_up)
    return silu_mul_reference(gate_up)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> each row's argmax (int64), the first index on ties, as torch.argmax."""
    if logits.is_cpu and build.load() and logits.dtype == torch.float32 and logits.dim() == 2:
        ids = torch.ops.ferrolm_cpu.argmax_rows(logits)
        bad = ids < 0  # a row with a NaN: torch ranks NaN highest
        if bool(bad.any()):
            ids[bad] = logits[bad].argmax(-1)
        return ids
    return logits.argmax(-1)
