import json

import pytest
from typer.testing import CliRunner

from ferrolm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "--kv-cache-memory-gb", "0.01"]


def test_run_json(tiny_args):
    res = runner.invoke(app, ["run", "--prompt", "The people", "--max-tokens", "5", "--json", *tiny_args])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) >= {"text", "token_ids"} and len(out["token_ids"]) <= 5


def test_kv_dtype_from_env_and_flag(tiny_args, monkeypatch):
    monkeypatch.setenv("FERROLM_KV_CACHE_DTYPE", "nonsense")
    res = runner.invoke(app, ["run", "--prompt", "x", "--max-tokens", "2", *tiny_args])
    assert res.exit_code != 0 and "valid names" in res.output
    res = runner.invoke(
        app, ["run", "--prompt", "x", "--max-tokens", "2", "--kv-cache-dtype", "int8", *tiny_args]
    )
    assert res.exit_code == 0, res.output  # the flag wins over the env var


def test_config_file_is_read(tiny_args, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kv_cache:\n  dtype: q3\n")
    res = runner.invoke(app, ["run", "--prompt", "x", "--config", str(cfg), *tiny_args])
    assert res.exit_code != 0 and "q3" in res.output


def test_run_errors(tiny_args):
    res = runner.invoke(app, ["run", "--prompt", "x", "--model", "/no/such.gguf"])
    assert res.exit_code == 2 and "neither a known name" in res.output
    res = runner.invoke(app, ["run", "--prompt", "x", "--temperature", "-1", *tiny_args])
    assert res.exit_code == 2 and "temperature" in res.output
    res = runner.invoke(app, ["run", *tiny_args])
    assert res.exit_code != 0 and "--prompt" in res.output


def test_list_and_pull_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROLM_HOME", str(tmp_path))
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "smollm2-135m" in res.stdout and "not pulled" in res.stdout
    res = runner.invoke(app, ["pull", "llama-999b"])
    assert res.exit_code == 2 and "unknown model" in res.output
