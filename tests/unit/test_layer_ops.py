"""The fused per-layer ops (compiled) against their torch references."""

import pytest
import torch

from ferrolm.kernels import build
from ferrolm.models.layer_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    rope_,
    rope_reference,
    silu_mul,
    silu_mul_reference,
)

pytestmark = pytest.mark.skipif(not build.load(), reason="compiled kernels unavailable here")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 40])
def test_add_rms_norm_matches_the_reference(out_dtype, delta_dtype, T):
    x = torch.randn(T, 96) * 3
    w = torch.rand(96) + 0.5
    delta = None if delta_dtype is None else torch.randn(T, 96).to(delta_dtype)
    x_ref = x.clone()
    ref = add_rms_norm_reference(x_ref, delta, w, 1e-5, out_dtype)
    got = add_rms_norm(x, delta, w, 1e-5, out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-6)  # the residual, updated in place
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,heads,D", [(1, 9, 64), (5, 3, 64), (3, 2, 128)])
def test_rope_in_place_matches_the_reference(dtype, T, heads, D):
    freqs = torch.arange(T).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    x = torch.randn(T, heads, D).to(dtype)
    ref = rope_reference(x.clone(), cos, sin)
    got = rope_(x, cos, sin)
    assert got.data_ptr() == x.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,heads,kv_heads,D", [(1, 9, 3, 64), (16, 9, 3, 64), (70, 4, 4, 128), (3, 2, 1, 40)]
)
def test_split_qkv_rope_equals_copies_then_rope(dtype, T, heads, kv_heads, D):
    """The decoder loop's split of the merged projection (q and k rotated, v copied in one
    op): the very values of copying each part out and rotating it in place."""
    freqs = torch.arange(T).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D).to(dtype)
    q, k, v = torch.ops.ferrolm_cpu.split_qkv_rope(qkv, cos, sin, heads, kv_heads)
    parts = qkv.split([heads * D, kv_heads * D, kv_heads * D], 1)
    assert torch.equal(q, rope_(parts[0].contiguous().view(T, heads, D), cos, sin))
    assert torch.equal(k, rope_(parts[1].contiguous().view(T, kv_heads, D), cos, sin))
    assert torch.equal(v, parts[2].contiguous().view(T, kv_heads, D))
    with pytest.raises(RuntimeError, match="qkv: contiguous"):
        torch.ops.ferrolm_cpu.split_qkv_rope(qkv[:, 1:], cos, sin, heads, kv_heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,inter", [(1, 1536), (5, 40), (64, 24)])
def test_silu_mul_matches_the_reference(dtype, T, inter):
    gate_up = (torch.randn(T, 2 * inter) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, -20.0, 0.0, 30.0])  # exp's clamps and zero
    ref = silu_mul_reference(gate_up)
    got = silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == (T, inter)
    # fp32: the polynomial exp's few ulp; bf16: at most one bf16 step where the silu's rounding differs
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_argmax_rows_matches_torch_ties_and_nan():
    from ferrolm.models.layer_ops import argmax_rows

    x = torch.randn(7, 1000)
    x[1, 10] = x[1, 900] = 50.0  # a tie: the first index
    x[2, 999] = 60.0  # in the tail past the last full vector
    x[3, 5] = float("nan")  # torch ranks NaN highest
    x[4] = float("-inf")
    x[5, 0] = 70.0
    torch.testing.assert_close(argmax_rows(x), x.argmax(-1), rtol=0, atol=0)
