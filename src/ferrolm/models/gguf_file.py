"""A GGUF file's metadata and tensors, read directly (little-endian GGUF v2 and v3).

gguf-py's GGUFReader builds a numpy view per value of every array, so the token lists
alone (49,152 strings and as many merges in the default model's file, 262,144 tokens in
Gemma 3's) took 5 s and 23 s of every model load. Here the header is walked with
`struct`, numeric arrays are one `np.frombuffer` each, and the tensors are views of one
read-only memory map, shaped as GGUFReader shapes them (so `gguf.quants.dequantize` and the
loaders take them as they are): plain types in their numpy dtype, quantized ones (and BF16)
as rows of bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY, BOOL = 8, 9, 7
# Fixed-size value types: GGUF's type code -> little-endian struct format (numpy reads the
# same codes as dtypes).
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    BOOL: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
# Tensor types stored element by element (the rest, BF16 included, as bytes per row).
PLAIN = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # a view of the file


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"{self.path.name}: GGUF file ends inside its header") from None
        self.pos += struct.calcsize(fmt)
        return values

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path.name}: GGUF file ends inside its header")
        self.pos += n
        return str(self.buf[self.pos - n : self.pos], "utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            return self.array()
        if kind not in SCALARS:
            raise ValueError(f"{self.path.name}: unknown GGUF value type {kind}")
        return self.unpack(SCALARS[kind])[0]

    def array(self) -> list:
        kind, n = self.unpack("<IQ")
        if kind in SCALARS:
            dt = np.dtype(SCALARS[kind])
            if self.pos + n * dt.itemsize > len(self.buf):
                raise ValueError(f"{self.path.name}: GGUF file ends inside its header")
            values = np.frombuffer(self.buf, dt, n, self.pos)
            self.pos += n * dt.itemsize
            return values.tolist()
        if kind == STRING:  # token lists: one tight loop
            out, buf, pos, length = [], self.buf, self.pos, struct.Struct("<Q").unpack_from
            try:
                for _ in range(n):
                    (k,) = length(buf, pos)
                    out.append(str(buf[pos + 8 : pos + 8 + k], "utf-8", "replace"))
                    pos += 8 + k
            except struct.error:
                pos = len(buf) + 1
            if pos > len(buf):
                raise ValueError(f"{self.path.name}: GGUF file ends inside its header")
            self.pos = pos
            return out
        return [self.value(kind) for _ in range(n)]


def read_gguf_file(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata key -> value, tensors in file order). Values are Python scalars, strings or
    lists; tensor data are views of a read-only memory map of the file."""
    path = Path(path)
    mm = np.memmap(path, mode="r")
    buf = memoryview(mm)
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"{path.name}: not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.u32()
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file)" if swapped in VERSIONS else ""
        raise ValueError(
            f"{path.name}: GGUF version {version}{hint} is not supported; versions {VERSIONS} are"
        )
    n_tensors, n_kv = cur.unpack("<QQ")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.u32())
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        dims = cur.unpack(f"<{n_dims}Q")
        kind, offset = cur.unpack("<IQ")
        infos.append((name, dims, kind, offset))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"{path.name}: general.alignment {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"{path.name}: tensor {name} has unknown type {kind}") from None
        n = int(np.prod(dims, dtype=np.int64))
        shape = tuple(reversed(dims))
        if qtype in PLAIN:
            dt, count = np.dtype(PLAIN[qtype]), n
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise ValueError(f"{path.name}: tensor {name}'s rows are not whole {qtype.name} blocks")
            dt, count = np.dtype(np.uint8), n // block * size
            shape = (*shape[:-1], dims[0] // block * size)
        at = start + offset
        if at + count * dt.itemsize > len(mm):
            raise ValueError(f"{path.name}: tensor {name} runs past the end of the file")
        data = np.frombuffer(mm, dt, count, at).reshape(shape)
        tensors.append(GGUFTensor(name, tuple(dims), qtype, data))
    return meta, tensors
