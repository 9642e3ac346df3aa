"""The engine on a tiny random Llama, against HF transformers on the same weights."""

import gc
import weakref

import pytest
import torch
from recording import step_logits

from ferrolm import LLM, KvCacheDtype, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm32(tiny_model_dir):
    return LLM(
        str(tiny_model_dir), dtype="float32", kv_cache_dtype="fp32", kv_cache_num_blocks=64, block_size=4
    )


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_prefill_and_decode_logits_match_hf(llm32, tiny_hf_model):
    """Every decode step's logits equal HF's full forward on the same tokens."""
    eng = llm32.engine
    prompt = list(range(3, 40))
    token_ids, steps = step_logits(eng, prompt, 10)
    ref = _hf_logits(tiny_hf_model, token_ids)
    for i, got in enumerate(steps):
        torch.testing.assert_close(got, ref[len(prompt) - 1 + i], atol=1e-4, rtol=1e-4)
    assert eng.stats()["kv_blocks_used"] == 0


def test_batch_of_different_lengths_equals_each_alone(llm32):
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30)]
    together = llm32.generate(prompts, GREEDY)
    alone = [llm32.generate([p], GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 12 for o in together)


def test_chunked_prefill_equals_unchunked(tiny_model_dir, llm32):
    small = LLM(
        str(tiny_model_dir),
        dtype="float32",
        kv_cache_dtype="fp32",
        kv_cache_num_blocks=64,
        block_size=4,
        max_num_batched_tokens=7,
    )
    prompt = list(range(3, 60))
    assert small.generate([prompt], GREEDY)[0].token_ids == llm32.generate([prompt], GREEDY)[0].token_ids


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_every_dtype_generates(tiny_model_dir, dtype):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_dtype=dtype.value, kv_cache_memory_gb=0.01)
    out = llm.generate(["Fellow-Citizens of the Senate", "The"], GREEDY)
    assert [len(o.token_ids) for o in out] == [12, 12]
    assert llm.stats()["kv_dtype"] == dtype.value
    assert llm.engine.pool.keys[0].data.dtype == llm.engine.kv_spec.layers[0].key.storage


def test_bfloat16_compute_runs(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", kv_cache_dtype="int8", kv_cache_memory_gb=0.01)
    assert llm.engine.model.dtype == torch.bfloat16
    assert len(llm.generate(["The people"], GREEDY)[0].token_ids) == 12


def test_pool_smaller_than_max_model_len_is_fine(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_num_blocks=6, block_size=4, max_model_len=512)
    out = llm.generate([list(range(3, 13))], GREEDY)[0]
    assert len(out.token_ids) == 12  # 22 tokens fit in 6 blocks of 4
    with pytest.raises(ValueError, match="more than the whole cache holds"):
        llm.generate([list(range(3, 13))], SamplingParams(max_tokens=20))
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.engine.has_unfinished()


def test_bad_input_is_rejected_before_anything_is_queued(llm32):
    with pytest.raises(ValueError, match="max_model_len is 512"):
        llm32.generate(["ok", [3 + i % 300 for i in range(600)]], GREEDY)
    assert not llm32.engine.has_unfinished()
    with pytest.raises(ValueError, match="empty"):
        llm32.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        LLM("/no/such/model.gguf")
    with pytest.raises(ValueError, match="valid names"):
        LLM(str(llm32.config.model.name), kv_cache_dtype="int3")


def test_stop_at_eos_and_max_tokens(llm32):
    eos = llm32.engine.tokenizer.eos_token_ids
    out = llm32.generate([list(range(3, 20))], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.outputs[0].finish_reason in ("stop", "length")
    if out.outputs[0].finish_reason == "length":
        assert len(out.token_ids) == 5
    # A stop token id we force: the first greedy token.
    first = out.token_ids[0]
    stopped = llm32.generate([list(range(3, 20))], SamplingParams(temperature=0.0, stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.outputs[0].finish_reason == "stop"
    assert eos  # the tiny tokenizer has an EOS


def test_deleted_llm_releases_its_pool(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_gb=0.01)
    llm.generate(["x"], GREEDY)
    ref = weakref.ref(llm.engine.pool.keys[0].data)
    del llm
    gc.collect()
    assert ref() is None
