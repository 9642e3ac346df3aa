"""KV cache element formats: one row per dtype, the only place a dtype is defined.

Each row says how a key or value vector is stored (torch dtype, bytes per element),
whether it carries a scale (one fp16 per token per kv head) and how to quantize and
dequantize it. The engine never branches on a dtype name; it asks the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

# Smallest normal fp16 number: a stored scale is never zero or subnormal.
MIN_SCALE = 2.0**-14
FP16_MAX = 65504.0


class KvCacheDtype(str, Enum):
    """User-facing KV cache dtype; serializes lowercase."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    FP8_E5M2 = "fp8_e5m2"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | KvCacheDtype) -> KvCacheDtype:
        """Parse a name or a common alias; raise ValueError listing the valid names."""
        if isinstance(value, cls):
            return value
        key = str(value).strip().lower().replace("-", "_")
        if key in _ALIASES:
            return _ALIASES[key]
        valid = ", ".join(d.value for d in cls)
        raise ValueError(
            f"unknown KV cache dtype {value!r}; valid names: {valid} "
            f"(aliases such as f16, float16, bfloat16, i8, e4m3, fp8_e4m3, e5m2 are accepted)"
        )


_ALIASES: dict[str, KvCacheDtype] = {
    **{a: KvCacheDtype.FP32 for a in ("fp32", "f32", "float32", "float")},
    **{a: KvCacheDtype.FP16 for a in ("fp16", "f16", "float16", "half")},
    **{a: KvCacheDtype.BF16 for a in ("bf16", "bfloat16")},
    **{a: KvCacheDtype.INT8 for a in ("int8", "i8", "q8")},
    **{
        a: KvCacheDtype.FP8
        for a in ("fp8", "fp8_e4m3", "e4m3", "f8e4m3", "fp8e4m3", "float8_e4m3", "float8_e4m3fn")
    },
    **{a: KvCacheDtype.FP8_E5M2 for a in ("fp8_e5m2", "e5m2", "f8e5m2", "fp8e5m2", "float8_e5m2")},
}


@dataclass(frozen=True)
class KvFormat:
    """How one KV dtype stores a vector of one token for one kv head.

    qmax is None for plain casts. Otherwise the format is scaled:
    s = fp16(max(max|x| / qmax, 2^-14)), q = cast(clamp(x / s, -qmax, qmax)) (rounded
    to the nearest integer first when `rounds`), and dequantize(q, s) = q * s.
    """

    dtype: KvCacheDtype
    storage: torch.dtype
    qmax: float | None = None
    rounds: bool = False
    scale_dtype: torch.dtype = torch.float16
    reference_only: bool = False
    # Optional fast path for reading: storage -> a float tensor w with w * widen_factor == q
    # exactly (torch's own fp8 -> fp32 cast is scalar code on CPU, many times slower).
    widen: Callable[[torch.Tensor], torch.Tensor] | None = None
    widen_factor: float = 1.0

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.storage).element_size()

    @property
    def scale_bytes(self) -> int:
        """Bytes of scale per token per kv head (0 for unscaled formats)."""
        return torch.empty((), dtype=self.scale_dtype).element_size() if self.scaled else 0

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token takes for one kv head, for K or for V."""
        return head_dim * self.elem_bytes + self.scale_bytes

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [..., head_dim] -> (data [..., head_dim], scale [...] or None)."""
        if not self.scaled:
            return x.to(self.storage), None
        xf = x.float()
        amax = xf.abs().amax(dim=-1)
        scale = (amax / self.qmax).clamp(min=MIN_SCALE, max=FP16_MAX).to(self.scale_dtype)
        q = (xf / scale.float().unsqueeze(-1)).clamp(-self.qmax, self.qmax)
        if self.rounds:
            q = q.round()
        return q.to(self.storage), scale

    def dequantize(
        self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Inverse of quantize, computed in fp32 and returned in `dtype`."""
        if not self.scaled:
            return data.to(dtype)
        w = self.widen(data) if self.widen is not None else data
        s = scale.float()
        if self.widen_factor != 1.0:
            s = s * self.widen_factor
        return (w.float() * s.unsqueeze(-1)).to(dtype)


def _widen_e4m3(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bits s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 read 2^8 too small, subnormals
    included (the exponent biases differ by 15 - 7); the caller multiplies by 256. fp16
    keeps every code a normal or subnormal fp16 number of moderate size, so nothing is
    flushed or lost when it is widened to fp32. Shifts and masks run in place."""
    x = q.view(torch.int8).to(torch.int16)  # sign-extended: bits 7..15 copy the sign
    x <<= 7  # sign now in bit 15, with a stray copy in bit 14 for negative codes
    x &= -0x4001  # 0xBFFF: clear bit 14
    return x.view(torch.float16)


def _widen_e5m2(q: torch.Tensor) -> torch.Tensor:
    """E5M2 is the high byte of fp16."""
    x = q.view(torch.int8).to(torch.int16)
    x <<= 8
    return x.view(torch.float16)


FORMATS: dict[KvCacheDtype, KvFormat] = {
    f.dtype: f
    for f in (
        KvFormat(KvCacheDtype.FP32, torch.float32, reference_only=True),
        KvFormat(KvCacheDtype.FP16, torch.float16),
        KvFormat(KvCacheDtype.BF16, torch.bfloat16),
        KvFormat(KvCacheDtype.INT8, torch.int8, qmax=127.0, rounds=True),
        KvFormat(KvCacheDtype.FP8, torch.float8_e4m3fn, qmax=448.0, widen=_widen_e4m3, widen_factor=256.0),
        KvFormat(KvCacheDtype.FP8_E5M2, torch.float8_e5m2, qmax=57344.0, widen=_widen_e5m2),
    )
}


def get_format(dtype: str | KvCacheDtype) -> KvFormat:
    return FORMATS[KvCacheDtype.parse(dtype)]
