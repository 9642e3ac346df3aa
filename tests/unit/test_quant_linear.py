"""4-bit weights as shipped: lossless repacking of GGUF Q4_0/Q4_1 and the fused kernel."""

import numpy as np
import pytest
import torch

from ferrolm.models.quant_linear import Q4Linear, q4_from_gguf


def _gguf_blocks(kind: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Random GGUF bytes of an [N, K] tensor: per block fp16 d (and m for Q4_1), 16 code bytes."""
    rng = np.random.default_rng(seed)
    nb = K // 32
    d = (rng.random((N, nb)) * 0.02 + 1e-3).astype(np.float16)
    parts = [d.view(np.uint8).reshape(N, nb, 2)]
    if kind == "Q4_1":
        m = (rng.standard_normal((N, nb)) * 0.05).astype(np.float16)
        parts.append(m.view(np.uint8).reshape(N, nb, 2))
    parts.append(rng.integers(0, 256, (N, nb, 16), dtype=np.uint8))
    return np.concatenate(parts, axis=-1).reshape(N, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_repacking_is_lossless_against_gguf_dequantize(kind):
    import gguf

    raw = _gguf_blocks(kind, 48, 128)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(48, 128)
    w = q4_from_gguf(raw, kind, (48, 128))
    assert torch.equal(w.dequantize(), torch.from_numpy(np.asarray(ref, dtype=np.float32)))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_linear_matches_the_dense_layer(kind, rows, dtype):
    w = q4_from_gguf(_gguf_blocks(kind, 80, 192, seed=rows), kind, (80, 192))
    layer = Q4Linear(w)
    x = torch.randn(rows, 192).to(dtype)
    ref = (x.float() @ w.dequantize().t()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the product is rounded to bf16
    torch.testing.assert_close(layer(x), ref, atol=tol, rtol=tol)
    layer.compiled = False  # the path without compiled kernels
    torch.testing.assert_close(layer(x), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("K", [96, 576])  # 3 and 18 blocks: a row's scales below and past 16
def test_q8_0_head_is_lossless_and_matches_the_dense_head(K):
    import gguf

    from ferrolm.models.quant_linear import Q8Linear, q8_from_gguf

    rng = np.random.default_rng(1)
    N = 70
    d = (rng.random((N, K // 32)) * 0.01 + 1e-3).astype(np.float16)
    q = rng.integers(-128, 128, (N, K // 32, 32), dtype=np.int8)
    raw = np.concatenate((d.view(np.uint8).reshape(N, -1, 2), q.view(np.uint8)), axis=-1).reshape(N, -1)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(N, K)
    w = q8_from_gguf(raw, (N, K))
    assert torch.equal(w.dequantize(), torch.from_numpy(np.asarray(ref, dtype=np.float32)))
    head = Q8Linear(w)
    dense = w.dequantize().double()
    # GEMV, AMX (where built: x's two parts in one tile up to 8 rows, 16-row tiles), 64-row chunks
    for rows in (1, 5, 8, 9, 20, 33, 64, 70):
        x = torch.randn(rows, K)
        exact = x.double() @ dense.t()
        # The AMX path carries x as two bf16 parts (16 significant bits) with exact weights:
        # each logit within 2^-16 of sum |w x| (the fp32 GEMV is far inside that bound).
        size = x.double().abs() @ dense.abs().t()
        assert ((head(x).double() - exact).abs() <= 2.0**-16 * size + 1e-7).all()
        head.compiled = False  # the fp32 product: within K fp32 roundings of sum |w x|
        assert ((head(x).double() - exact).abs() <= K * 2.0**-24 * size + 1e-7).all()
        head.compiled = True


def _q8_head(N: int, K: int, seed: int):
    from ferrolm.models.quant_linear import Q8Linear, Q8Weight

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    scales = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-3).half()
    return Q8Linear(Q8Weight(codes, scales))


@pytest.mark.parametrize("K", [96, 576, 608])  # 3, 18 and 19 blocks: an odd last pair, scales past 16
def test_q8_0_head_bf16_products_keep_each_rows_top_exact(K):
    """bf16 compute's head (with AMX from 5 rows: weights and x rounded to bf16; without it
    from 16 rows, AVX512-BF16: x rounded; every logit that could be its row's maximum then
    recomputed from x; elsewhere the fp32 paths): each logit within those roundings of the
    exact product, each row's maximum x's exact product."""
    N = 70  # four tiles of 16 output rows and a partial one
    head = _q8_head(N, K, seed=K)
    head.bf16_products = True
    dense = head.q8.dequantize().double()
    for rows in (1, 5, 8, 15, 16, 17, 33, 64, 70):
        x = torch.randn(rows, K) * 3
        exact = x.double() @ dense.t()
        size = x.double().abs() @ dense.abs().t()
        got = head(x).double()
        assert ((got - exact).abs() <= (2.0**-8 + K * 2.0**-23) * size + 1e-6).all()
        top = exact.argmax(-1, keepdim=True)
        assert torch.equal(got.argmax(-1, keepdim=True), top)
        assert (
            (got.gather(1, top) - exact.gather(1, top)).abs() <= K * 2.0**-23 * size.gather(1, top) + 1e-6
        ).all()


def test_q8_0_head_bf16_products_break_a_tie_of_the_rounded_x_exactly():
    """Two logits that x rounded to bf16 makes equal (components 1 + 2^-9 and 1 + 2^-10 both
    round to 1) come out as x's exact products, the larger one the row's maximum."""
    from ferrolm.models.quant_linear import Q8Linear, Q8Weight

    N, K = 40, 64
    codes = torch.zeros(N, K, dtype=torch.int8)
    codes[5, 2] = 100  # row 5 reads x[2], row 30 reads x[1]: equal in bf16, x[1] larger
    codes[30, 1] = 100
    head = Q8Linear(Q8Weight(codes, torch.full((N, K // 32), 0.01).half()))
    head.bf16_products = True
    x = torch.zeros(16, K)
    x[:, 1], x[:, 2] = 1 + 2.0**-9, 1 + 2.0**-10
    assert torch.equal(x.bfloat16()[:, 1], x.bfloat16()[:, 2])
    got = head(x)
    d = head.q8.scales[0, 0].float().item()
    assert (got.argmax(-1) == 30).all()
    assert torch.equal(got[:, 30], torch.full((16,), 100 * d * (1 + 2.0**-9)))
    assert torch.equal(got[:, 5], torch.full((16,), 100 * d * (1 + 2.0**-10)))


@pytest.mark.parametrize("K", [160, 224, 576, 1536])  # 5, 7, 18, 48 blocks: every partial quad
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 12, 16, 17, 33, 64, 65])
def test_bf16_activations_paths_round_once(K, rows):
    """bf16 x: the bf16-dot-product GEMV (up to 4 rows) is the exact product rounded once to
    bf16; the AMX path (more rows, where the CPU has it), the tiles of weights rounded to bf16
    (5-64 rows, AVX512-BF16 without AMX) and the dense path multiply weights rounded to bf16
    and are that product rounded once. Either way within one bf16 step (plus the fp32
    accumulation's K roundings of sum |w x|, which matter only for sums near zero) of one of
    the two exact references, for every tail of a quad of blocks and of a 16-row tile."""
    w = q4_from_gguf(_gguf_blocks("Q4_1", 37, K, seed=K + rows), "Q4_1", (37, K))
    layer = Q4Linear(w)
    x = torch.randn(rows, K).bfloat16()
    got = layer(x).double()
    dense = w.dequantize()
    for weights in (dense, dense.bfloat16()):
        exact = x.double() @ weights.double().t()
        size = x.double().abs() @ weights.double().abs().t()
        ulp = exact.abs().clamp_min(1e-2) * 2.0**-8 + K * 2.0**-24 * size  # one bf16 step (8 bits)
        if ((got - exact).abs() <= ulp).all():
            return
    raise AssertionError(f"neither reference within one bf16 step: max err {(got - exact).abs().max()}")
