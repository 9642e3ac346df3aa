"""The Triton attention backend: every KV format on NVIDIA GPUs (kernels/triton_kv.py).

One store launch per layer writes a step's new K and V in their stored formats; one
attention launch (two when the context is split) reads the paged cache in place. The
pool, the block tables and the formats are the CPU's, byte for byte. Runs on CUDA
tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests). Rotated formats are
rotated inside the kernels (keys and values before they are quantized, by the reference's
butterflies; queries and outputs by a product with the Hadamard matrix), so a rotation
costs no launch of its own.
Per-channel halves (int4pc) need the pool's fp16 staging bookkeeping and stay with the
torch backend.
"""

from __future__ import annotations

import functools
import os

import torch

from ferrolm.attention.hadamard import fwht, hadamard
from ferrolm.attention.metadata import AttentionMetadata
from ferrolm.kv.dtypes import KvFormat
from ferrolm.kv.pool import HalfCache, KvPool
from ferrolm.kv.spec import KvSpec

_PLAIN = (torch.float32, torch.float16, torch.bfloat16)
_TOKEN = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
_DUMMY: dict[torch.device, torch.Tensor] = {}
MATRIX_ROTATION_MAX_D = 128


@functools.cache
def triton_missing() -> str | None:
    """Why Triton kernels cannot run here (None: they can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    return None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _interpreter_compat() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with int(array) on a
    one-element array, which NumPy >= 2.4 refuses; take the element instead. Interpreter
    only: compiled kernels never reach this code."""
    from triton.runtime import interpreter as it

    original = it._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    it._patch_lang_tensor = patched


@functools.cache  # per format (rows are frozen): attend asks per layer and step
def format_kind(fmt: KvFormat) -> int | None:
    """kernels/triton_kv.py's kind of a format (None: the kernels cannot store or read it)."""
    if fmt.per_channel_block:
        return None
    if not fmt.scaled:
        return 0 if fmt.pack == 1 and fmt.storage in _PLAIN else None
    if fmt.scale_dtype != torch.float16:
        return None
    if fmt.pack == 1 and fmt.group_size is None and fmt.storage in _TOKEN:
        return 1
    if fmt.pack == 2 and fmt.storage == torch.uint8 and fmt.group_size and fmt.group_size % 2 == 0:
        if fmt.codebook is not None:
            return 3 if len(fmt.codebook) == 16 else None
        return 2 if fmt.rounds and fmt.qmax == 7.0 else None
    return None


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a GPU (asked once: attend runs per layer and step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonBackend:
    name = "triton"
    rotates = True  # Hadamard rotations run inside the kernels (attention/layer.py)

    def __init__(
        self,
        splits: int | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        scale_tiles: bool = True,
    ) -> None:
        # Launch settings for tests and bench/gpu_attention.py's sweep: `splits` forces the
        # number of context splits (None: by occupancy), `block_n` the keys per tile, and
        # num_warps / num_stages Triton's own (None: its defaults).
        self.force_splits = splits
        self.block_n = block_n
        # Per-token scales on the K/V tiles (True: their loads feed the dots and are
        # prefetched with the tiles; 5-10% faster on an H200) or on the scores and
        # probabilities (fewer multiplies, but loads the pipeliner leaves in the loop).
        self.scale_tiles = scale_tiles
        self.launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
        if interpreted() and triton_missing() is None:
            _interpreter_compat()
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def supports_device(cls, device: torch.device | str) -> bool:
        kind = torch.device(device).type
        return kind == "cuda" or (kind == "cpu" and interpreted())

    def unsupported(self, spec: KvSpec) -> str | None:
        if (why := triton_missing()) is not None:
            return why
        for lk in spec.layers:
            for fmt in (lk.key, lk.value):
                if format_kind(fmt) is None:
                    what = "per-channel blocks with fp16 staging" if fmt.per_channel_block else "its layout"
                    return f"the Triton kernels do not read {fmt.name} ({what}); the torch backend does"
        return None

    def _aux(self, fmt: KvFormat, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook levels, midpoints between them) for nf4-like formats, else placeholders;
        the midpoints computed as KvFormat.quantize computes them."""
        key = (fmt.codebook, device)
        if key not in self._tables:
            if fmt.codebook is None:
                dummy = torch.zeros(16, dtype=torch.float32, device=device)
                self._tables[key] = (dummy, dummy)
            else:
                levels = torch.tensor(fmt.codebook, device=device)
                mids = ((levels[1:] + levels[:-1]) / 2).float().contiguous()
                self._tables[key] = (levels.float().contiguous(), mids)
        return self._tables[key]

    def _hadamard(self, d: int, device: torch.device) -> torch.Tensor:
        key = ("hadamard", d, device)
        if key not in self._tables:
            self._tables[key] = hadamard(d, device).contiguous()
        return self._tables[key]

    @staticmethod
    def _scale(half: HalfCache) -> torch.Tensor:
        if half.scale is not None:
            return half.scale
        dev = half.data.device
        if dev not in _DUMMY:
            _DUMMY[dev] = torch.zeros(1, dtype=torch.float16, device=dev)
        return _DUMMY[dev]

    def write(self, pool: KvPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        from ferrolm.kernels.triton_kv import store_kv_kernel

        T, H, D = k.shape
        if T == 0:
            return
        kh, vh = pool.keys[layer], pool.values[layer]
        v = v.to(k.dtype)
        if k.stride() != v.stride() or k.stride(-1) != 1:  # one set of strides for both
            k, v = k.contiguous(), v.contiguous()
        ks, vs = self._scale(kh), self._scale(vh)
        store_kv_kernel[(T,)](
            k,
            v,
            slots,
            kh.data,
            ks,
            vh.data,
            vs,
            self._aux(kh.fmt, k.device)[1],
            self._aux(vh.fmt, k.device)[1],
            k.stride(0),
            k.stride(1),
            kh.data.stride(0),
            ks.stride(0) if kh.scale is not None else 0,
            vh.data.stride(0),
            vs.stride(0) if vh.scale is not None else 0,
            H=H,
            HP=1 << (H - 1).bit_length(),
            D=D,
            K_KIND=format_kind(kh.fmt),
            K_GS=kh.fmt.group_size or D,
            K_QMAX=float(kh.fmt.qmax or 0.0),
            K_ROUNDS=bool(kh.fmt.rounds),
            K_ROT=kh.fmt.rotated,
            V_KIND=format_kind(vh.fmt),
            V_GS=vh.fmt.group_size or D,
            V_QMAX=float(vh.fmt.qmax or 0.0),
            V_ROUNDS=bool(vh.fmt.rounds),
            V_ROT=vh.fmt.rotated,
            LOG2D=D.bit_length() - 1,
            NORM=1.0 / D**0.5,
            SOFT=interpreted(),
        )

    def _splits(self, programs: int, max_ctx: int, quantized: bool, device: torch.device) -> int:
        """Context splits per (sequence, kv head): enough programs for two per SM, and for
        quantized formats at least one split per 2048 keys up to 4. Measured on an H200
        (bench/results/h200_attention_*.log, 8 kv heads x 64): plain fp16 streams at 4.3-4.5
        TB/s with the occupancy rule alone, while int8 and fp8 wait on their loads (ncu: 22%
        of DRAM bandwidth, most warps stalled on L1TEX) and run 1.3-1.5x faster with 4
        splits at 8k keys."""
        if self.force_splits is not None:
            return self.force_splits
        if device.type != "cuda":
            return 1
        sms = _sm_count(device)
        want = _pow2(_cdiv(2 * sms, max(programs, 1)))
        if quantized:  # 1, 2, 4 splits from 2k, 4k, 8k keys
            want = max(want, min(4, 1 << max(0, (max_ctx // 2048).bit_length() - 1)))
        return max(1, min(want, 32, _pow2(max(1, max_ctx // 512))))

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        pool: KvPool,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        from ferrolm.kernels.triton_kv import combine_kernel, paged_attention_kernel

        T, H, D = q.shape
        kh, vh = pool.keys[layer], pool.values[layer]
        KVH = kh.data.shape[0]
        G = H // KVH
        GP = _pow2(G)
        B = meta.block_tables.shape[0]
        max_q = meta.max_q
        # At least 16 rows (the tensor cores' smallest tile): decodes pad the G heads of one
        # query to 16 rows; prefill tiles stack 64 rows of queries x heads.
        BLOCK_M = max(1, (16 if max_q == 1 else 64) // GP)
        m_tiles = _cdiv(max_q, BLOCK_M)
        max_ctx = meta.max_context
        # 128 keys per tile for heads of up to 64 (H200: fp16 4.0 -> 4.3-4.5 TB/s, int8 +25%).
        BLOCK_N = self.block_n or (128 if D <= 64 else 64 if D <= 128 else 32)
        quantized = format_kind(kh.fmt) > 0 or format_kind(vh.fmt) > 0
        splits = self._splits(B * m_tiles * KVH, max_ctx, quantized, q.device)
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        R = BLOCK_M * GP
        if splits > 1:
            part = torch.empty((B * m_tiles * KVH * splits * R, D), dtype=torch.float32, device=q.device)
            ml = torch.empty((B * m_tiles * KVH * splits * R, 2), dtype=torch.float32, device=q.device)
        else:
            part = ml = out
        # Queries and outputs are rotated in the kernel by a product with the [D, D] Hadamard
        # matrix up to D = 128 (64 KB); past that it would not fit in shared memory (D = 256,
        # Gemma 3: ~300 KB of the 227 a Hopper block has), and the butterflies run outside.
        rot_q = kh.fmt.rotated and D > MATRIX_ROTATION_MAX_D
        rot_out = vh.fmt.rotated and D > MATRIX_ROTATION_MAX_D
        if rot_q:
            q = fwht(q).to(q.dtype)
        if q.stride(-1) != 1:
            q = q.contiguous()
        import triton.language as tl

        # The dot's input type: one that holds the stored values exactly (fp16 holds every
        # fp16, int8, fp8 and 4-bit code; bf16 caches need bf16, fp32 ones fp32).
        stored = (kh.fmt.storage, vh.fmt.storage)
        dt = (
            tl.float32 if torch.float32 in stored else tl.bfloat16 if torch.bfloat16 in stored else tl.float16
        )
        if dt == tl.bfloat16 and interpreted():  # the interpreter's bf16 dot reads the bits as integers
            dt = tl.float32
        ks, vs = self._scale(kh), self._scale(vh)
        had = self._hadamard(D, q.device)
        common = dict(G=G, GP=GP, BLOCK_M=BLOCK_M, D=D)
        paged_attention_kernel[(B * m_tiles, KVH, splits)](
            q,
            out,
            kh.data,
            ks,
            vh.data,
            vs,
            self._aux(kh.fmt, q.device)[0],
            self._aux(vh.fmt, q.device)[0],
            had,
            meta.block_tables,
            meta.q_start,
            meta.ctx_len,
            part,
            ml,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            kh.data.stride(0),
            ks.stride(0) if kh.scale is not None else 0,
            vh.data.stride(0),
            vs.stride(0) if vh.scale is not None else 0,
            meta.block_tables.stride(0),
            m_tiles,
            scale * 1.4426950408889634,  # log2(e): the kernel's softmax uses exp2
            window or 0,
            BLOCK_N=BLOCK_N,
            BS=pool.block_size,
            K_KIND=format_kind(kh.fmt),
            K_GS=kh.fmt.group_size or D,
            V_KIND=format_kind(vh.fmt),
            V_GS=vh.fmt.group_size or D,
            SPLITS=splits,
            DT=dt,
            Q_ROT=kh.fmt.rotated and not rot_q,
            O_ROT=vh.fmt.rotated and not rot_out and splits == 1,
            SCALE_TILES=self.scale_tiles,
            Q_FIX=kh.fmt.fixed_point_query,
            **common,
            **self.launch,
        )
        if splits > 1:
            combine_kernel[(B * m_tiles, KVH)](
                out,
                part,
                ml,
                had,
                meta.q_start,
                out.stride(0),
                out.stride(1),
                m_tiles,
                SPLITS=splits,
                O_ROT=vh.fmt.rotated and not rot_out,
                **common,
            )
        if rot_out:
            out = fwht(out).to(out.dtype)
        return out.view(T, H * D)
