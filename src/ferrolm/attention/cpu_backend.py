"""The compiled CPU attention backend: reads every KV format in place.

No gathered copy and no widened context: the kernel (kernels/cpu_attention.cpp) walks
each sequence's block table 16 keys at a time, converts them to fp32 in an L1 buffer,
folds per-token scales into the scores and the probabilities, and keeps an online
softmax, in parallel over (sequence, kv head, query tile) and over context splits
when there are too few of those. Writes quantize in one compiled pass with the same
arithmetic as KvFormat.quantize (identical bytes); per-channel halves (int4pc) are
written by the pool, whose staging bookkeeping stays in Python.
"""

from __future__ import annotations

import torch

from ferrolm.attention.hadamard import fwht
from ferrolm.attention.metadata import AttentionMetadata
from ferrolm.attention.torch_backend import TorchBackend
from ferrolm.kernels import build
from ferrolm.kv.dtypes import KvFormat
from ferrolm.kv.pool import HalfCache, KvPool
from ferrolm.kv.spec import KvSpec

F32, F16, BF16, I8, E4M3, E5M2, LUT4, PC4 = range(8)
_PLAIN = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
_SCALED = {torch.int8: I8, torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}
MAX_ROWS = 64  # query rows (query heads x queries) per work item
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
_EMPTY = torch.empty(0)


# Flag on a format's code: queries dotted with these keys are rounded to fixed point first
# (kv/fixed_point.py), and the kernel may dot them in integers.
FIXED_QUERY = 16


def format_code(fmt: KvFormat) -> int | None:
    """The kernel's code for a format (None: the kernel cannot read it)."""
    code = _storage_code(fmt)
    if code is None or not fmt.fixed_point_query:
        return code
    return code | FIXED_QUERY


def _storage_code(fmt: KvFormat) -> int | None:
    if fmt.per_channel_block:
        return PC4 if fmt.pack == 2 and fmt.scale_dtype == torch.float16 else None
    if not fmt.scaled:
        return _PLAIN.get(fmt.storage) if fmt.pack == 1 else None
    if fmt.scale_dtype != torch.float16:
        return None
    if fmt.pack == 1 and fmt.group_size is None:
        return _SCALED.get(fmt.storage)
    if fmt.pack == 2 and fmt.storage == torch.uint8 and fmt.group_size and fmt.group_size % 16 == 0:
        return LUT4
    return None


def _lut(fmt: KvFormat) -> torch.Tensor:
    """LUT4: the value of each nibble before the group scale (q - 8, or the codebook)."""
    if fmt.pack != 2 or fmt.per_channel_block:
        return _EMPTY
    levels = fmt.codebook if fmt.codebook is not None else [i - 8.0 for i in range(16)]
    return torch.tensor(levels, dtype=torch.float32)


def _mids(fmt: KvFormat) -> torch.Tensor:
    """Codebook formats: the midpoints between levels, computed as KvFormat.quantize does."""
    if fmt.codebook is None:
        return _EMPTY
    levels = torch.tensor(fmt.codebook)
    return ((levels[1:] + levels[:-1]) / 2).float().contiguous()


class CpuBackend:
    name = "cpu"
    rotates = True  # Hadamard rotations of rotated formats run inside the kernels (layer.py)

    def __init__(self) -> None:
        self._luts: dict[KvFormat, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reference = TorchBackend()  # other head_dims (writes are identical)
        self.available = build.load()  # builds once per machine; unsupported() says why not

    @classmethod
    def supports_device(cls, device: torch.device | str) -> bool:
        return torch.device(device).type == "cpu"

    def unsupported(self, spec: KvSpec) -> str | None:
        for lk in spec.layers:
            for fmt in (lk.key, lk.value):
                if format_code(fmt) is None:
                    return f"the compiled kernel cannot read {fmt.name}"
        if not self.available:
            return build.failure()
        return None

    def tables(self, fmt: KvFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """(LUT4 nibble values, codebook midpoints) of a format, as the kernels take them."""
        if fmt not in self._luts:
            self._luts[fmt] = (_lut(fmt), _mids(fmt))
        return self._luts[fmt]

    def write(self, pool: KvPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for half, x in ((pool.keys[layer], k), (pool.values[layer], v)):
            if half.fmt.per_channel_block:
                x = fwht(x) if half.fmt.rotated else x
                pool.write_staged(half, slots, x.transpose(0, 1))
                continue
            qmax = half.fmt.qmax or 0.0
            torch.ops.ferrolm_cpu.write(
                x,
                slots,
                half.data,
                half.scale,
                format_code(half.fmt),
                qmax,
                self.tables(half.fmt)[1],
                int(half.fmt.rotated),
            )

    def _half_args(self, half: HalfCache):
        return (half.data, half.scale, half.staging, format_code(half.fmt), self.tables(half.fmt)[0])

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        pool: KvPool,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        K, V = pool.keys[layer], pool.values[layer]
        if pool.head_dim not in KERNEL_HEAD_DIMS:  # the reference, rotating as layer.py would
            q = fwht(q) if K.fmt.rotated else q
            out = self._reference.attend(q, layer, pool, meta, scale, window)
            if V.fmt.rotated:
                T, HD = out.shape
                out = fwht(out.view(T, HD // pool.head_dim, pool.head_dim)).view(T, HD)
            return out
        row_of = pool.row_of if (K.staging is not None or V.staging is not None) else None
        return torch.ops.ferrolm_cpu.attend(
            q,  # any float dtype: converted inside; the output comes back in q's dtype
            *self._half_args(K),
            *self._half_args(V),
            row_of,
            meta.block_tables,
            meta.q_start,
            meta.ctx_len,
            pool.block_size,
            scale,
            MAX_ROWS,
            torch.get_num_threads(),
            int(K.fmt.rotated),
            int(V.fmt.rotated),
            window or 0,
        )
