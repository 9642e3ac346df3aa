import json

from click.testing import CliRunner

from ferrolm.cli import app


def test_bench_tiny_configuration_with_hf_baseline(tiny_model_dir, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--kv-dtypes",
            "fp16,int8/int4",
            "--prompt-len",
            "8",
            "--output-len",
            "4",
            "--concurrency",
            "1,2",
            "--context-lens",
            "8,16",
            "--decode-concurrency",
            "1,3",
            "--decode-steps",
            "6",
            "--repeats",
            "2",
            "--kv-cache-memory-gb",
            "0.01",
            "--baseline",
            "hf",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    rows = {(r["engine"], r["kv_dtype"], r["concurrency"]) for r in data["results"]}
    assert rows == {("ferrolm", d, c) for d in ("fp16", "int8/int4") for c in (1, 2)} | {
        ("hf", "hf-dynamic-cache", 1),
        ("hf", "hf-dynamic-cache", 2),
    }
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["tpot_s"] > 0
        if r["engine"] == "ferrolm":
            assert r["x_hf"] > 0 and r["x_fp16"] > 0
    by = {(r["kv_dtype"], r["concurrency"]): r for r in data["results"] if r["engine"] == "ferrolm"}
    for c in (1, 2):  # int8/int4 ran in turns with fp16: its ratio is that of its paired runs
        assert by[("int8/int4", c)]["x_fp16"] == by[("int8/int4", c)]["paired_x_fp16"]
        assert by[("fp16", c)]["x_fp16"] == 1.0 and "paired_x_fp16" not in by[("fp16", c)]
    grid = {(g["kv_dtype"], g["concurrency"], g["context"]): g for g in data["decode_grid"]}
    assert set(grid) == {(d, c, n) for d in ("fp16", "int8/int4") for c in (1, 3) for n in (8, 16)}
    assert all(g["tokens_per_s"] > 0 and g["x_fp16"] > 0 for g in grid.values())
    assert grid[("fp16", 3, 16)]["x_fp16"] == 1.0
    paired = grid[("int8/int4", 3, 16)]  # its ratio: fp16's steps taken in turns with its own
    assert paired["x_fp16"] == paired["paired_fp16_step_s"] / paired["step_s"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_hf_baseline_runs_the_same_weights(tiny_model_dir, tiny_hf_model):
    """The baseline model built from ferrolm's tensors predicts exactly what HF's own load does."""
    import torch

    from ferrolm import LLMEngine
    from ferrolm.config import EngineConfig
    from ferrolm.eval.bench import hf_model_like

    eng = LLMEngine(
        EngineConfig().with_flags(dict(model=str(tiny_model_dir), dtype="float32", kv_cache_memory_gb=0.01))
    )
    hf = hf_model_like(eng)
    ids = torch.tensor([[5, 9, 33, 2, 7, 100]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tiny_hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_bench_rejects_empty_grid_points():
    for flag, value in (
        ("--decode-concurrency", "0"),
        ("--context-lens", "128,0"),
        ("--concurrency", "0"),
        ("--decode-steps", "0"),
    ):
        res = CliRunner().invoke(app, ["bench", flag, value])
        assert res.exit_code != 0 and ">= 1" in res.output, (flag, res.output)


def test_bench_rejects_unknown_baselines_and_a_missing_llamacpp(monkeypatch):
    res = CliRunner().invoke(app, ["bench", "--baseline", "vllm"])
    assert res.exit_code != 0 and "valid: none, hf, llama.cpp" in res.output, res.output
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import fails as if absent
    res = CliRunner().invoke(app, ["bench", "--baseline", "hf,llama.cpp"])
    assert res.exit_code != 0 and "pip install 'ferrolm[llamacpp]'" in res.output, res.output


def test_bench_rejects_unknown_llamacpp_cache_types(monkeypatch):
    import ferrolm.eval.llamacpp as lc

    monkeypatch.setattr(lc, "available", lambda: None)
    res = CliRunner().invoke(app, ["bench", "--baseline", "llama.cpp", "--llamacpp-cache-types", "f16,q3"])
    assert res.exit_code != 0 and "'q3'" in res.output and "q8_0" in res.output, res.output


def test_interleaved_runs_take_turns_with_an_untimed_step_each_turn():
    from ferrolm.eval.bench import interleaved_step_times

    log = []

    class Run:
        def __init__(self, name):
            self.name = name

        def steps(self, k):
            log.append((self.name, k))
            return [float(len(log))] * k

    a, b = Run("a"), Run("b")
    times = interleaved_step_times([a, b], steps=5, turn=2)
    assert [len(t) for t in times] == [5, 5]
    # each run once through its prefill, then turns: one untimed step and up to `turn` timed
    assert log == [("a", 1), ("b", 1)] + [("a", 1), ("a", 2), ("b", 1), ("b", 2)] * 2 + [
        ("a", 1),
        ("a", 1),
        ("b", 1),
        ("b", 1),
    ]


def test_interleaved_runs_refuse_a_run_that_ended():
    import pytest

    from ferrolm.eval.bench import interleaved_step_times

    class Ended:
        def steps(self, k):
            return []

    with pytest.raises(RuntimeError, match="ended before"):
        interleaved_step_times([Ended()], steps=3, turn=1)


def test_decode_grid_without_fp16_or_with_fp16_alone(tiny_model_dir):
    from ferrolm.eval.bench import BenchConfig, _ferrolm_grid

    kw = dict(model=str(tiny_model_dir), context_lens=(8,), decode_concurrency=(2,), decode_steps=3)
    kw |= dict(kv_cache_memory_gb=0.01, compute_dtype="float32")
    for specs in (("int8",), ("fp16",)):
        rows = _ferrolm_grid(
            BenchConfig(kv_dtypes=specs, **kw), "one two three four five six seven " * 20, print
        )
        assert [r["kv_dtype"] for r in rows] == list(specs)
        assert rows[0]["tokens_per_s"] > 0 and "paired_fp16_step_s" not in rows[0]
