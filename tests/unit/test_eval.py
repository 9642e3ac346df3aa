import json

import pytest
from click.testing import CliRunner
from conftest import sotu_text

from ferrolm.cli import app
from ferrolm.eval.quality import evaluate
from ferrolm.kv.dtypes import KvCacheDtype

ALL = [d.value for d in KvCacheDtype] + ["int8/int4", "int4;0=fp16;-1=fp16"]


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    return evaluate(str(tiny_model_dir), sotu_text(), ALL, context=64, windows=3, prefix=20, chunk=16)


def test_every_dtype_reported(report):
    assert [r["dtype"] for r in report["results"]] == ALL
    for r in report["results"]:
        assert r["tokens_scored"] == 3 * (64 - 20 - 1)
        assert r["ppl"] > 1 and r["kl_mean"] >= 0 and 0 <= r["top1_agreement_pct"] <= 100


def test_reference_against_itself(report):
    ref = report["results"][0]
    assert ref["dtype"] == "fp32" and ref["kl_mean"] == 0 and ref["top1_agreement_pct"] == 100
    assert ref["delta_ppl_pct"] == 0


def test_chunk_size_does_not_change_the_result(tiny_model_dir, report):
    other = evaluate(str(tiny_model_dir), sotu_text(), ALL, context=64, windows=3, prefix=20, chunk=5)
    for a, b in zip(report["results"], other["results"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)
        assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=1e-2, abs=1e-7)


def test_bad_arguments(tiny_model_dir):
    with pytest.raises(ValueError, match="not enough"):
        evaluate(str(tiny_model_dir), "too short", ALL, context=64, windows=3, prefix=20)
    with pytest.raises(ValueError, match="prefix"):
        evaluate(str(tiny_model_dir), sotu_text(), ALL, context=64, windows=1, prefix=64)


def test_cli_eval_writes_json_and_plot(tiny_model_dir, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--kv-dtypes",
            "int8,int8/int4",
            "--context",
            "48",
            "--windows",
            "2",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {"results", "windows", "context", "prefix", "model"} <= set(data)
    assert [r["dtype"] for r in data["results"]] == ["fp32", "int8", "int8/int4"]
    keys = {"dtype", "ppl", "delta_ppl_pct", "kl_mean", "kl_p99", "top1_agreement_pct", "bytes_per_token"}
    assert all(keys <= set(r) for r in data["results"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| int8 |" in res.output and "| int8/int4 |" in res.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--kv-dtypes", "int3"])
    assert bad.exit_code == 2 and "valid names" in bad.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--kv-dtypes", "int4;99=fp16"])
    assert bad.exit_code == 2 and "out of range" in bad.output
