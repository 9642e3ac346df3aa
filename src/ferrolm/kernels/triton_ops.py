"""Triton kernels for a decoder layer's small ops on CUDA: residual add + RMSNorm, RoPE in
place, SwiGLU. Each replaces 3-10 eager torch kernels (models/layer_ops.py has the torch
references): a decode step of Llama-1B ran ~45 kernels per layer, and at one sequence
their count, not their arithmetic, set the step time (3.1 ms against a 0.74 ms roofline,
bench/results/h200_gpu_decode.log). Everything computes in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def add_rms_norm(x: torch.Tensor, delta, weight: torch.Tensor, eps: float, out_dtype) -> torch.Tensor:
    """x [T, H] fp32 (last dim contiguous) += delta in place; RMSNorm(x) * weight in out_dtype."""
    T, H = x.shape
    out = torch.empty((T, H), dtype=out_dtype, device=x.device)
    if T:
        d = delta.reshape(T, H) if delta is not None else x
        if d.stride(-1) != 1:
            d = d.contiguous()
        block = _pow2(H)
        add_rms_norm_kernel[(T,)](
            x, d, weight, out, eps, H, x.stride(0), d.stride(0), out.stride(0),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )  # fmt: skip
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on x [T, heads, D] (any token and head strides, last dim contiguous)."""
    T, heads, D = x.shape
    if T:
        rope_kernel[(T, heads)](x, cos, sin, x.stride(0), x.stride(1), HALF=D // 2)
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up [T, I] in gate_up's dtype."""
    T, I2 = gate_up.shape
    out = torch.empty((T, I2 // 2), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        grid = (T, -(-(I2 // 2) // 1024))
        silu_mul_kernel[grid](gate_up, out, I2 // 2, gate_up.stride(0), out.stride(0), BLOCK=1024)
    return out


@triton.jit
def add_rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, out_ptr, eps, n, x_stride, d_stride, o_stride, HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: x += delta (in place, fp32), out = weight * x / sqrt(mean(x^2) + eps)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + row * x_stride + i, mask=ok, other=0.0)
    if HAS_DELTA:
        x += tl.load(delta_ptr + row * d_stride + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * x_stride + i, x, mask=ok)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    tl.store(out_ptr + row * o_stride + i, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, t_stride, h_stride, HALF: tl.constexpr,
):  # fmt: skip
    """Rotate-half RoPE in place on one (token, head) vector of a strided [T, heads, D] view:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin fp32 [T, D] (halves equal)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    base = x_ptr + t * t_stride + h * h_stride
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + i)
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + i)
    s1 = tl.load(sin_ptr + t * 2 * HALF + i)
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + i)
    ty = x_ptr.dtype.element_ty
    tl.store(base + i, (x1 * c1 - x2 * s1).to(ty))
    tl.store(base + HALF + i, (x2 * c2 + x1 * s2).to(ty))


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, n, gu_stride, o_stride, BLOCK: tl.constexpr):
    """One row of [gate | up] -> silu(gate) * up."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(gu_ptr + row * gu_stride + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * gu_stride + n + i, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * o_stride + i, y.to(out_ptr.dtype.element_ty), mask=ok)
