"""The KV quality report on the real model and real prose: the dtypes fall in the expected order."""

import pytest
from conftest import sotu_text

from ferrolm.eval.quality import evaluate
from ferrolm.kv.dtypes import KvCacheDtype

pytestmark = pytest.mark.integration


def test_kl_order_on_real_text(default_model_path, capsys):
    from ferrolm.eval.quality import format_table

    report = evaluate(
        str(default_model_path),
        sotu_text(),
        list(KvCacheDtype),
        context=384,
        windows=3,
        prefix=128,
        chunk=128,
    )
    with capsys.disabled():
        print("\n" + format_table(report))
    r = {x["dtype"]: x for x in report["results"]}
    kl = {d: r[d]["kl_mean"] for d in r}
    assert kl["fp32"] == 0 and r["fp32"]["top1_agreement_pct"] == 100
    assert 0 < kl["fp16"] <= kl["bf16"] < kl["int8"] < kl["fp8"] < kl["fp8_e5m2"]
    assert kl["fp8"] >= 3 * kl["int8"]  # several times: 3 mantissa bits against int8's 7
    assert r["int8"]["top1_agreement_pct"] >= 95
