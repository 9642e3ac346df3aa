"""prompt_logprobs (vLLM's) on the tiny model, against HF transformers: top-N entries,
full distributions per step, and no gaps or repeats under chunking, prefix caching
and preemption; long_prefill_token_threshold caps a sequence's chunk."""

import pytest
import torch
from test_engine import make_engine, run_all

from ferrolm import SamplingParams

PROMPT = list(range(10, 47))


@pytest.fixture(scope="module")
def hf_logp(tiny_hf_model):
    with torch.no_grad():
        return tiny_hf_model(torch.tensor([PROMPT])).logits[0].log_softmax(-1)


def _check_top(entries, hf_logp, k):
    assert entries[0] is None and len(entries) == len(PROMPT)
    for j in range(1, len(PROMPT)):
        entry, ref = entries[j], hf_logp[j - 1]
        assert entry[PROMPT[j]] == pytest.approx(float(ref[PROMPT[j]]), abs=1e-4)
        assert set(ref.topk(k).indices.tolist()) <= set(entry)


@pytest.mark.parametrize("flags", [{}, {"max_num_batched_tokens": 7}, {"long_prefill_token_threshold": 5}])
def test_top_n_prompt_logprobs_match_hf(tiny_model_dir, hf_logp, flags):
    eng = make_engine(tiny_model_dir, **flags)
    out = run_all(eng, {"x": (PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=3))})["x"]
    _check_top(out.prompt_logprobs, hf_logp, 3)


def test_full_rows_per_step_cover_the_prompt_once(tiny_model_dir, hf_logp):
    eng = make_engine(tiny_model_dir, long_prefill_token_threshold=8)
    eng.add_request("x", PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=-1))
    starts, rows = [], []
    while eng.has_unfinished():
        for out in eng.step():
            if out.prompt_logprob_rows is not None:
                starts.append(out.prompt_logprobs_start)
                rows.append(out.prompt_logprob_rows)
    assert starts == [0, 8, 16, 24, 32]  # chunks of 8 (the last chunk's final row samples)
    full = torch.cat(rows)
    assert full.shape == (len(PROMPT) - 1, hf_logp.shape[1])
    assert torch.allclose(full, hf_logp[:-1], atol=1e-4)


def test_prefix_cache_hit_still_computes_every_prompt_position(tiny_model_dir, hf_logp):
    eng = make_engine(tiny_model_dir, enable_prefix_caching=True)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    run_all(eng, {"warm": (PROMPT, greedy)})
    out = run_all(eng, {"x": (PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=0))})["x"]
    _check_top(out.prompt_logprobs, hf_logp, 0)


def test_preemption_neither_repeats_nor_drops_positions(tiny_model_dir, hf_logp):
    eng = make_engine(tiny_model_dir, kv_cache_num_blocks=18, max_num_batched_tokens=8)
    long = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    other = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    final = run_all(eng, {"a": (list(range(100, 112)), other), "x": (PROMPT, long)}, schedule={"x": 1})
    assert eng.stats()["num_preemptions"] > 0
    _check_top(final["x"].prompt_logprobs, hf_logp, 2)


def test_prompt_logprobs_limit(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    with pytest.raises(ValueError, match="max_logprobs"):
        eng.check_request(3, SamplingParams(prompt_logprobs=21))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-2)
