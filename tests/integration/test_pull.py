"""`ferrolm pull` into an empty FERROLM_HOME, the way a fresh machine gets the model."""

import hashlib

import pytest
from click.testing import CliRunner

from ferrolm.cli import app
from ferrolm.models.registry import REGISTRY

pytestmark = pytest.mark.integration


def test_pull_into_empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROLM_HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["pull", "smollm2-135m"])
    assert res.exit_code == 0, res.output
    entry = REGISTRY["smollm2-135m"]
    path = tmp_path / "models" / "smollm2-135m" / entry.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    listing = CliRunner().invoke(app, ["list"]).stdout.splitlines()
    line = next(ln for ln in listing if "smollm2-135m" in ln)
    assert "pulled" in line and "not pulled" not in line
    assert "not pulled" in next(ln for ln in listing if "gemma3-270m" in ln)
