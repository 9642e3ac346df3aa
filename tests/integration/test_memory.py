"""Pools are allocated once and freed with their LLM: many LLMs must not grow the process."""

import gc
from pathlib import Path

import pytest

from ferrolm import LLM, SamplingParams

pytestmark = pytest.mark.integration
POOL_GB = 0.25


def _rss_gb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc to read the resident set size")
    kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return kb / (1 << 20)


def test_many_llms_do_not_grow_without_bound(default_model_path):
    def one_round():
        llm = LLM(str(default_model_path), dtype="float32", kv_cache_dtype="int8", kv_cache_memory_gb=POOL_GB)
        pool = llm.engine.pool
        assert pool.nbytes() <= POOL_GB * (1 << 30)
        for t in pool.tensors():
            t.zero_()  # touch every page, as a full cache would
        llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4))

    one_round()  # weights are loaded once and shared; count from here
    gc.collect()
    base = _rss_gb()
    for _ in range(6):
        one_round()
        gc.collect()
    grown = _rss_gb() - base
    assert grown < 2 * POOL_GB, f"RSS grew by {grown:.2f} GiB over 6 LLMs with {POOL_GB} GiB pools"
