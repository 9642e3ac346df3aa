"""KV cache element formats: one row per dtype, the only place a dtype is defined.

Each row owns its layout: the storage dtype, bits per value and how many values
share one storage element (two 4-bit values per byte), the scale (one fp16 per
group of `group_size` values along head_dim; None = one per token per kv head),
whether vectors are Hadamard-rotated before they are stored, and the quantize /
dequantize rules. The pool asks a row for its data and scale shapes and bytes;
the engine never branches on a dtype name. Read-side speed tricks (widening fp8
with bit operations) belong to attention backends, not to the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    INT4 = "int4"
    INT4_G16 = "int4_g16"
    NF4 = "nf4"
    INT4_PC = "int4pc"

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
            f"(aliases: {', '.join(sorted(a for a in _ALIASES if a not in {d.value for d in cls}))})"
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
    **{a: KvCacheDtype.INT4 for a in ("int4", "i4", "q4", "int4_hadamard")},
    **{a: KvCacheDtype.INT4_G16 for a in ("int4_g16", "i4_g16")},
    **{a: KvCacheDtype.NF4 for a in ("nf4",)},
    **{a: KvCacheDtype.INT4_PC for a in ("int4pc", "int4_pc", "int4_per_channel", "kivi")},
}

# NF4 (QLoRA): 16 levels at quantiles of a standard normal, scaled to [-1, 1], with an
# exact zero. After the Hadamard rotation K and V are close to Gaussian.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class KvFormat:
    """How one KV dtype stores the vector of one token for one kv head.

    qmax is None for plain casts. Otherwise the format is scaled, per group of
    `group_size` values (None: the whole head_dim, one scale per token per head):
    s = fp16(max(max|x_group| / qmax, 2^-14)), q = cast(clamp(x / s, -qmax, qmax))
    (rounded to the nearest integer first when `rounds`), dequantize(q, s) = q * s.
    With `rotated`, the vector is multiplied by an orthonormal Hadamard matrix before
    it is quantized (by the attention layer, which rotates queries alike and rotates
    the output back); quantize/dequantize here act on the stored, rotated values.
    `pack` values share one storage element (2: two signed 4-bit values per byte,
    stored as q + 8 in the low nibble for even and the high nibble for odd indices).
    """

    dtype: KvCacheDtype | str
    storage: torch.dtype
    bits: int
    qmax: float | None = None
    rounds: bool = False
    pack: int = 1
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16
    rotated: bool = False
    reference_only: bool = False
    # Non-uniform 4-bit: q is the index of the nearest level of x / s (s = absmax of the
    # group, qmax 1), dequantize = levels[q] * s.
    codebook: tuple[float, ...] | None = None
    # Per channel over whole blocks (KIVI, for keys): one fp16 scale and one fp16 minimum
    # per (block, kv head, channel), asymmetric: q = clamp(round((x - m) / s), 0, qmax) with
    # s = fp16(max((max - min) / qmax, 2^-14)), m = fp16(min) over the block's tokens. A
    # block is quantized once it is full; until then the pool keeps its tokens in fp16.
    per_channel_block: bool = False
    # Queries dotted with these keys are first rounded to 15-bit fixed point per (token,
    # head) (kv/fixed_point.py), so integer codes (int8, int4) can be dotted in integers;
    # every backend alike.
    fixed_point_query: bool = False

    @property
    def name(self) -> str:
        return self.dtype.value if isinstance(self.dtype, KvCacheDtype) else str(self.dtype)

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def elem_bytes(self) -> int:
        """Bytes of one storage element (which holds `pack` values)."""
        return torch.empty((), dtype=self.storage).element_size()

    @property
    def scale_bytes(self) -> int:
        """Bytes of one scale (0 for unscaled formats)."""
        return torch.empty((), dtype=self.scale_dtype).element_size() if self.scaled else 0

    def check_head_dim(self, head_dim: int, block_size: int = 16) -> None:
        if self.per_channel_block and (2 * head_dim * self.scale_bytes) % block_size:
            raise ValueError(
                f"KV format {self.name} shares {2 * head_dim * self.scale_bytes} bytes of scales per block: "
                f"block_size must divide it, got {block_size}"
            )
        group = self.group_size or head_dim
        if head_dim % self.pack or head_dim % group:
            raise ValueError(
                f"KV format {self.name} needs head_dim divisible by {self.pack} and by its group size "
                f"{group}; this model's head_dim is {head_dim}"
            )
        if self.rotated and head_dim & (head_dim - 1):
            raise ValueError(
                f"KV format {self.name} rotates by a Hadamard matrix: head_dim must be a power of 2"
            )

    def data_dim(self, head_dim: int) -> int:
        """Storage elements per token per kv head."""
        return head_dim // self.pack

    def num_groups(self, head_dim: int) -> int:
        """Scales per token per kv head (0 for unscaled formats)."""
        return head_dim // (self.group_size or head_dim) if self.scaled else 0

    def bytes_per_head(self, head_dim: int, block_size: int = 16) -> int:
        """Bytes one token takes for one kv head, for K or for V, scales included (for
        per-channel formats, the block's scales and minima shared by its tokens)."""
        data = self.data_dim(head_dim) * self.elem_bytes
        if self.per_channel_block:
            return data + 2 * head_dim * self.scale_bytes // block_size
        return data + self.num_groups(head_dim) * self.scale_bytes

    def quantize_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel formats: x [..., block_size, D] -> (data [..., block_size, D / pack],
        scale and minimum [..., 2, D])."""
        xf = x.float()
        lo, hi = xf.amin(dim=-2), xf.amax(dim=-2)
        scale = ((hi - lo) / self.qmax).clamp(min=MIN_SCALE, max=FP16_MAX).to(self.scale_dtype)
        low = lo.clamp(-FP16_MAX, FP16_MAX).to(self.scale_dtype)
        q = ((xf - low.float().unsqueeze(-2)) / scale.float().unsqueeze(-2)).round().clamp(0, self.qmax)
        return _pack_int4(q - 8), torch.stack((scale, low), dim=-2)

    def dequantize_block(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Inverse of quantize_block: fp32 [..., block_size, D]."""
        q = self.unpack(data).float() + 8
        return q * scale[..., 0:1, :].float() + scale[..., 1:2, :].float()

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [..., head_dim] -> (data [..., data_dim], scale [..., num_groups] or None)."""
        if not self.scaled:
            return x.to(self.storage), None
        D = x.shape[-1]
        groups = self.num_groups(D)
        xf = x.float().reshape(*x.shape[:-1], groups, D // groups)
        amax = xf.abs().amax(dim=-1)
        scale = (amax / self.qmax).clamp(min=MIN_SCALE, max=FP16_MAX).to(self.scale_dtype)
        q = (xf / scale.float().unsqueeze(-1)).clamp(-self.qmax, self.qmax)
        if self.codebook is not None:
            levels = torch.tensor(self.codebook, device=x.device)
            q = torch.bucketize(q.contiguous(), (levels[1:] + levels[:-1]) / 2).float() - 8  # index - 8
        elif self.rounds:
            q = q.round()
        q = q.reshape(x.shape)
        if self.pack == 2:
            return _pack_int4(q), scale
        return q.to(self.storage), scale

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """Stored elements -> one value per element along head_dim (q, not yet scaled)."""
        return _unpack_int4(data) if self.pack == 2 else data

    def dequantize(
        self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Inverse of quantize, computed in fp32 and returned in `dtype` (still rotated
        for rotated formats)."""
        q = self.unpack(data)
        if self.codebook is not None:
            q = torch.tensor(self.codebook, device=q.device)[(q + 8).long()]
        q = q.float()
        if not self.scaled:
            return q.to(dtype)
        groups = scale.shape[-1]
        D = q.shape[-1]
        out = q.reshape(*q.shape[:-1], groups, D // groups) * scale.float().unsqueeze(-1)
        return out.reshape(q.shape).to(dtype)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-7, 7] (float), [..., D] -> uint8 [..., D / 2]: q + 8 in two nibbles."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D / 2] -> int8 [..., D] in [-8, 7] (zero-filled bytes read as -8; their
    scales are zero, so they dequantize to zero)."""
    lo = (data & 0xF).to(torch.int8) - 8
    hi = (data >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


# Two signed 4-bit codes per byte (q + 8), one fp16 scale per 32 values; int4_g16 is the
# same with groups of 16.
_INT4 = KvFormat(
    KvCacheDtype.INT4,
    torch.uint8,
    bits=4,
    qmax=7.0,
    rounds=True,
    pack=2,
    group_size=32,
    rotated=True,
    fixed_point_query=True,
)

FORMATS: dict[KvCacheDtype, KvFormat] = {
    f.dtype: f
    for f in (
        KvFormat(KvCacheDtype.FP32, torch.float32, bits=32, reference_only=True),
        KvFormat(KvCacheDtype.FP16, torch.float16, bits=16),
        KvFormat(KvCacheDtype.BF16, torch.bfloat16, bits=16),
        # Rotated: measured with `ferrolm eval` (8 x 1024, SmolLM2-135M, bf16 compute), the
        # Hadamard rotation lowers the mean KL to the fp32 cache 1.9x for int8, 1.3x for
        # fp8 and e5m2 (README); kv_cache_rotation = off stores them unrotated.
        KvFormat(
            KvCacheDtype.INT8,
            torch.int8,
            bits=8,
            qmax=127.0,
            rounds=True,
            rotated=True,
            fixed_point_query=True,
        ),
        KvFormat(KvCacheDtype.FP8, torch.float8_e4m3fn, bits=8, qmax=448.0, rotated=True),
        KvFormat(KvCacheDtype.FP8_E5M2, torch.float8_e5m2, bits=8, qmax=57344.0, rotated=True),
        _INT4,
        replace(_INT4, dtype=KvCacheDtype.INT4_G16, group_size=16),
        KvFormat(
            KvCacheDtype.NF4,
            torch.uint8,
            bits=4,
            qmax=1.0,
            pack=2,
            group_size=32,
            rotated=True,
            codebook=NF4_LEVELS,
        ),
        # Not rotated: per-channel scales rely on the channels' own ranges.
        KvFormat(
            KvCacheDtype.INT4_PC, torch.uint8, bits=4, qmax=15.0, rounds=True, pack=2, per_channel_block=True
        ),
    )
}


def get_format(dtype: str | KvCacheDtype) -> KvFormat:
    return FORMATS[KvCacheDtype.parse(dtype)]
