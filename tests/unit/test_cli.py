import json

import click
import pytest
from click.testing import CliRunner

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


def test_run_prompt_as_argument(tiny_args):
    args = ["--max-tokens", "4", "--json", *tiny_args]
    by_flag = runner.invoke(app, ["run", "--prompt", "The people", *args])
    by_arg = runner.invoke(app, ["run", "The people", *args])
    assert by_flag.exit_code == 0 and by_arg.exit_code == 0, by_arg.output
    assert json.loads(by_arg.stdout.splitlines()[-1]) == json.loads(by_flag.stdout.splitlines()[-1])
    both = runner.invoke(app, ["run", "The people", "--prompt", "x", *args])
    assert both.exit_code != 0 and "not both" in both.output


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
    res = runner.invoke(app, ["run", "--prompt", "x", "--kv-cache-num-blocks", "0", *tiny_args])
    assert res.exit_code == 2 and "num_blocks" in res.output


def test_interactive_chat_keeps_the_conversation(tiny_args):
    res = runner.invoke(
        app, ["run", "--max-tokens", "4", *tiny_args], input="hello\n/reset\nagain\nmore\n/exit\n"
    )
    assert res.exit_code == 0, res.output
    assert res.output.count(">>> ") == 5


def test_config_prints_the_merged_config(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kv_cache]\ndtype = "bf16"\nmemory_gb = 3.0\n')
    monkeypatch.setenv("FERROLM_KV_CACHE_DTYPE", "int8")
    res = runner.invoke(app, ["config", "--config", str(cfg), "--max-num-seqs", "9", "--format", "json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.output)
    assert data["kv_cache"]["dtype"] == "int8" and data["kv_cache"]["memory_gb"] == 3.0
    assert data["scheduler"]["max_num_seqs"] == 9
    res = runner.invoke(app, ["config", "--format", "yaml"], env={"FERROLM_CONFIG": str(cfg)})
    assert "dtype: int8" in res.output  # FERROLM_KV_CACHE_DTYPE still set, env beats the file


def test_list_and_pull_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROLM_HOME", str(tmp_path))
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "smollm2-135m" in res.stdout and "not pulled" in res.stdout
    res = runner.invoke(app, ["pull", "llama-999b"])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_flags_come_from_the_table_and_env_vars_never_collide():
    from ferrolm.config import ENGINE_FLAGS, FLAGS, SERVER_FLAGS, env_var

    owners: dict[str, set[str]] = {}
    for name, cmd in app.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.envvar:
                owners.setdefault(p.envvar, set()).add(f"{name}:{p.name}")
    serve = {p.name for p in app.commands["serve"].params}
    run = {p.name for p in app.commands["run"].params}
    assert set(FLAGS) <= serve and set(ENGINE_FLAGS) <= run and not set(SERVER_FLAGS) & run
    shared_ok = {env_var(n) for n in FLAGS} | {env_var("config")}
    for var, where in owners.items():
        assert len({w.split(":")[1] for w in where}) == 1, (var, where)  # one meaning per variable
        assert len(where) == 1 or var in shared_ok, (var, where)
    assert "FERROLM_RUN_JSON" in owners and "FERROLM_EVAL_JSON" in owners and "FERROLM_JSON" not in owners
    assert "FERROLM_EVAL_KV_DTYPES" in owners  # eval's list of specs is not the engine's dtype
    assert "FERROLM_KV_CACHE_DTYPE" not in {v for v, w in owners.items() if any("eval" in x for x in w)}


def test_server_limits_from_env_reach_the_config(monkeypatch):
    monkeypatch.setenv("FERROLM_MAX_N", "3")
    monkeypatch.setenv("FERROLM_REQUEST_TIMEOUT", "7.5")
    res = runner.invoke(app, ["config", "--format", "json", "--max-stop", "2"])
    assert res.exit_code == 0, res.output
    server = json.loads(res.stdout)["server"]
    assert server["max_n"] == 3 and server["request_timeout"] == 7.5 and server["max_stop"] == 2
