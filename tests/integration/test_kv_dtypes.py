"""Every KV dtype on the real default model: on topic, and close to the fp32 cache."""

import pytest

from ferrolm import LLM, KvCacheDtype, SamplingParams

pytestmark = pytest.mark.integration
LOSSY = [d for d in KvCacheDtype if d is not KvCacheDtype.FP32]

PROMPTS = [
    "The capital of France is",
    "Fellow-Citizens of the Senate and House of Representatives: Since your last annual assembling",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The three primary colors are",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1492, Christopher Columbus",
    "Water boils at a temperature of",
]
# Per prompt agreement can legitimately be low (two near-tied logits flip and the
# continuations diverge); the mean over prompts is the meaningful figure.
# Measured on 10 prompts (2026-11): fp16 32.0, bf16 32.0, int8 23.3, fp8 19.1, fp8_e5m2 10.6;
# on an AMX machine: int8 21.8, fp8 15.0, fp8_e5m2 10.6, int4 10.2. int4 is chaotic here:
# rounding the query to 15-bit fixed point (2026-11-30; KL to the fp32 cache unchanged,
# 4.49e-2 -> 4.42e-2 at fp32 compute) moved its mean from 11.3 to 5.8 (three prompts flip
# at a near tie within their first 5 tokens) and int4_g16's from 10.1 to 12.7: with ~86%
# per-token agreement a mean of ~6 +- 2 is what 10 prompts give, so its floor is 3.
MEAN_AGREEMENT_FLOOR = {"fp16": 28, "bf16": 24, "int8": 16, "fp8": 10, "fp8_e5m2": 6, "int4": 3}


@pytest.fixture(scope="module")
def greedy_by_dtype(default_model_path):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    out = {}
    for dtype in KvCacheDtype:
        llm = LLM(
            str(default_model_path), dtype="float32", kv_cache_dtype=dtype.value, kv_cache_memory_gb=0.1
        )
        out[dtype.value] = [o.token_ids for o in llm.generate(PROMPTS, params)]
        del llm
    return out


def _prefix_agreement(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("dtype", LOSSY)
def test_paris(default_model_path, dtype):
    llm = LLM(str(default_model_path), dtype="float32", kv_cache_dtype=dtype.value, kv_cache_memory_gb=0.1)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert "Paris" in out.text, out.text


def test_greedy_prefix_agreement_with_fp32(greedy_by_dtype):
    ref = greedy_by_dtype["fp32"]
    print("\nfirst-32-greedy-token prefix agreement with the fp32 cache:")
    print(f"{'dtype':<10}{'mean':>7}{'min':>5}  per prompt")
    means = {}
    for dtype in (d.value for d in LOSSY):
        agree = [_prefix_agreement(a, b) for a, b in zip(greedy_by_dtype[dtype], ref)]
        means[dtype] = sum(agree) / len(agree)
        print(f"{dtype:<10}{means[dtype]:>7.1f}{min(agree):>5}  {agree}")
    for dtype, floor in MEAN_AGREEMENT_FLOOR.items():
        assert means[dtype] >= floor, f"{dtype}: mean agreement {means[dtype]:.1f} < {floor}"
