"""The CUDA path's fused layer ops (kernels/triton_ops.py) against their torch references,
run in Triton's interpreter without a GPU (on the GPU itself where there is one)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")

from ferrolm.kernels import triton_ops  # noqa: E402
from ferrolm.models.layer_ops import add_rms_norm_reference, rope_reference, silu_mul_reference  # noqa: E402


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("hidden", [64, 576])
def test_add_rms_norm(out_dtype, with_delta, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g).to(DEVICE)
    delta = torch.randn(5, hidden, generator=g).to(torch.bfloat16).to(DEVICE) if with_delta else None
    w = torch.randn(hidden, generator=g).to(DEVICE)
    x_ref = x.clone()
    got = triton_ops.add_rms_norm(x, delta, w, 1e-5, out_dtype)
    want = add_rms_norm_reference(x_ref, delta, w, 1e-5, out_dtype)
    torch.testing.assert_close(x, x_ref, atol=0, rtol=0)  # the residual update is exact
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_strided_views(dtype):
    """q and k as views of one merged q/k/v output, as the CUDA layers pass them."""
    T, h, kvh, d = 4, 3, 1, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (h + 2 * kvh) * d, generator=g).to(dtype).to(DEVICE)
    ang = torch.randn(T, d // 2, generator=g)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    ref = qkv.clone()
    q, k, v = torch.split(qkv, [h * d, kvh * d, kvh * d], dim=-1)
    triton_ops.rope_(q.view(T, h, d), cos, sin)
    triton_ops.rope_(k.view(T, kvh, d), cos, sin)
    rq, rk, rv = (t.contiguous() for t in torch.split(ref, [h * d, kvh * d, kvh * d], dim=-1))
    rope_reference(rq.view(T, h, d), cos, sin)
    rope_reference(rk.view(T, kvh, d), cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q.float(), rq.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(k.float(), rk.float(), atol=tol, rtol=tol)
    assert torch.equal(v, rv)  # values untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(3, 2 * 1536, generator=g) * 4).to(dtype).to(DEVICE)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        triton_ops.silu_mul(gu).float(), silu_mul_reference(gu).float(), atol=tol, rtol=tol
    )
