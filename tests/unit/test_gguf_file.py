"""models/gguf_file.py against gguf-py: a file written by gguf's GGUFWriter with every
metadata value type and several tensor types reads back as GGUFReader reads it, and
damaged files are refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ferrolm.models.gguf_file import read_gguf_file  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "every-type.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_bool("t.yes", True)
    w.add_bool("t.no", False)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ünï", "<0x0A>"])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2, 8)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    for qtype in (
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.BF16,
    ):
        x = rng.standard_normal((6, 64)).astype(np.float32)
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor(qtype.name.lower(), q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_read_as_gguf_py_reads_them(written):
    meta, tensors = read_gguf_file(written)
    ref = gguf.GGUFReader(str(written))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(meta) == list(fields)
    for key, field in fields.items():
        if key == "t.nested":
            continue  # gguf-py's contents() does not decode arrays of arrays
        assert meta[key] == field.contents(), key
    assert meta["t.nested"] == [[1, 2], [3]]
    assert meta["t.u64"] == 2**63 + 5 and meta["t.yes"] is True and meta["t.str"] == "héllo ▁world"
    assert meta["t.strs"] == ["a", "", "ünï", "<0x0A>"]
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(tensors, ref.tensors):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
        assert np.array_equal(mine.data.view(np.uint8), np.asarray(theirs.data).view(np.uint8)), mine.name
    q8 = next(t for t in tensors if t.name == "q8_0")
    assert q8.data.shape == (6, 2 * 34)  # rows of two Q8_0 blocks of 34 bytes
    assert not q8.data.flags.writeable  # views of the file, not copies


def _damaged(src, tmp_path, edit) -> str:
    data = bytearray(src.read_bytes())
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(edit(data)))
    return path


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda d: b"GGML" + d[4:], "no GGUF magic"),
        (lambda d: d[:4] + (1).to_bytes(4, "little") + d[8:], "version 1 is not supported"),
        (lambda d: d[:4] + (3).to_bytes(4, "big") + d[8:], "big-endian"),
        (lambda d: d[:200], "ends inside its header"),
        (lambda d: d[:-100], "runs past the end of the file"),
    ],
    ids=["magic", "version", "big-endian", "truncated-header", "truncated-data"],
)
def test_damaged_files_are_refused_with_the_reason(written, tmp_path, edit, reason):
    with pytest.raises(ValueError, match=reason):
        read_gguf_file(_damaged(written, tmp_path, edit))
