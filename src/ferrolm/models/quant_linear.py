"""4-bit linear layers that keep GGUF Q4_0 / Q4_1 weights as shipped.

A Q4_1 block of 32 weights is (d, m, 32 codes q in 0..15) with w = d q + m; Q4_0 is
w = d (q - 8), i.e. m = -8 d. Both are held as codes packed two per byte, plus fp16 d
and m per block (0.5625-0.625 bytes per weight instead of 4), and multiplied by the
compiled kernel (kernels/q4_linear.cpp: q4_linear), which dequantizes exactly as
GGUF does and accumulates in fp32: a fused GEMV over the exact weights for a few rows; for
more rows of bf16 x, tiles of the weights rounded to bf16 (AMX, or AVX512-BF16 dot
products, up to 64 rows); above that, or for fp32 x, dequantize into a reused matrix and
the dense GEMM.
Without the compiled kernels the layer dequantizes
on every call (correct, slow).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ferrolm.kernels import build

BLOCK = 32


class Q4Weight:
    """Codes [N, K / 2] uint8 in GGUF's layout (per block of 32, byte j: element j in the low
    nibble, element j + 16 in the high one), scales and mins [N, K / 32] fp16."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        self.codes, self.scales, self.mins = codes, scales, mins

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def permute_rows(self, fn) -> Q4Weight:
        return Q4Weight(fn(self.codes), fn(self.scales), fn(self.mins))

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: d q + m per block of 32."""
        N, K = self.shape
        c = self.codes.view(N, K // BLOCK, BLOCK // 2)
        q = torch.cat(((c & 0xF), (c >> 4)), dim=-1).to(torch.float32)  # [N, blocks, 32]
        w = q * self.scales.float().unsqueeze(-1) + self.mins.float().unsqueeze(-1)
        return w.view(N, K)


def q4_from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Q4Weight:
    """GGUF Q4_0/Q4_1 bytes of a [N, K] tensor -> Q4Weight (lossless repacking)."""
    N, K = shape
    nb = K // BLOCK
    per = 18 if type_name == "Q4_0" else 20
    blocks = np.ascontiguousarray(raw).reshape(N, nb, per)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if type_name == "Q4_0":
        m = (d.astype(np.float32) * -8).astype(np.float16)
        if not np.array_equal(m.astype(np.float32), d.astype(np.float32) * -8):
            raise ValueError("a Q4_0 scale times -8 is not an fp16 number")
        qs = blocks[..., 2:18]
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., 4:20]
    packed = np.ascontiguousarray(qs).reshape(N, K // 2)  # kept in GGUF's nibble order
    return Q4Weight(torch.from_numpy(packed), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()))


class Q4Linear(nn.Module):
    """y = x W^T (no bias) with W kept 4-bit; y in x's dtype."""

    def __init__(self, weight: Q4Weight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.q4 = weight  # not a buffer: model.to(dtype) must not touch codes or fp16 scales
        self.compiled = build.load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.compiled:
            y = torch.ops.ferrolm_cpu.q4_linear(x2, self.q4.codes, self.q4.scales, self.q4.mins)
        else:
            y = (x2.float() @ self.q4.dequantize().t()).to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.q4.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=4-bit as shipped"


class Q8Weight:
    """GGUF Q8_0 as shipped: codes [N, K] int8, scales [N, K / 32] fp16; w = d q."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        N, K = self.shape
        q = self.codes.view(N, K // BLOCK, BLOCK).float()
        return (q * self.scales.float().unsqueeze(-1)).view(N, K)


def q8_from_gguf(raw: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    N, K = shape
    blocks = np.ascontiguousarray(raw).reshape(N, K // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:34].copy().view(np.int8).reshape(N, K)
    return Q8Weight(torch.from_numpy(codes), torch.from_numpy(d.copy()))


class Q8Linear(nn.Module):
    """y = x W^T in fp32 (W kept as Q8_0): the output head of a GGUF that ships it so.

    With `bf16_products` (set for bf16 compute), batches of 5 rows or more run on weights and
    x rounded to bf16 where the CPU has AMX (16 rows or more on x rounded to bf16 where it has
    AVX512-BF16 alone), with every logit that could be its row's maximum recomputed from x in
    fp32 (kernels/q8_head.cpp, q8_linear_amx_folded, q8_linear_bf16): the top of each row,
    and so greedy choices, are x's exact products; the rest lie within a bound of about
    2^-8 |w| . |x| of them."""

    def __init__(self, weight: Q8Weight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.q8 = weight
        self.compiled = build.load()
        self.bf16_products = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.compiled:
            y = torch.ops.ferrolm_cpu.q8_linear(x2, self.q8.codes, self.q8.scales, self.bf16_products)
        else:
            y = x2.float() @ self.q8.dequantize().t()
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.q8.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=Q8_0 as shipped"
