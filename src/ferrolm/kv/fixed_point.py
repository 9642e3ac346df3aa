"""The query that integer keys (int8, int4) are dotted with: rounded to 15-bit fixed point.

Part of those formats' definition (`KvFormat.fixed_point_query`), the same in every
backend: per (token, query head), after the rotation, q becomes round(q / 2^e) * 2^e, e the
smallest integer (at least -126) with max|q| <= 16256 * 2^e. 16256 = 127 * 128, so the
integer q' = round(q / 2^e) splits exactly into an int8 high part and a low part in
[-64, 64]: q' = 128 * round(q' / 128) + rest, and q' . k for integer codes k is two int8
dot products per scale group, exact in int32 (the CPU kernel's VNNI path; the other paths
dot the rounded values in fp32). The rounding is at most 2^-14 of the row's largest element, finer than
the bf16 compute dtype's own rounding of q (2^-9 of each element); `ferrolm eval` shows
no change in int8's or int4's quality (README).
"""

from __future__ import annotations

import torch

FIXED_POINT_MAX = 16256  # 127 * 128
_MIN_EXP = -126  # 2^-e stays a normal fp32 number
# amax = m * 2^ex with m in [0.5, 1): amax <= 16256 * 2^e = 0.9921875 * 2^(14 + e)
_MANTISSA_LIMIT = 0.9921875


def query_exponent(q: torch.Tensor) -> torch.Tensor:
    """[..., D] -> int32 [..., 1]: e of each row (exact: from the bits, no division)."""
    m, ex = torch.frexp(q.abs().amax(dim=-1, keepdim=True))
    e = ex - 14 + (m > _MANTISSA_LIMIT).to(ex.dtype)
    return e.clamp(min=_MIN_EXP)


def round_query(q: torch.Tensor) -> torch.Tensor:
    """fp32 [..., D] -> fp32 [..., D], each row rounded to its fixed point (idempotent)."""
    e = query_exponent(q)
    return torch.ldexp(torch.round(torch.ldexp(q, -e)), e)
