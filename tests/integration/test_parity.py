"""ferrolm vs HF transformers on the real default model, fp32 weights and fp32 KV."""

import pytest
import torch
from conftest import sotu_text
from recording import run_recording_logits

from ferrolm import LLM

pytestmark = pytest.mark.integration
DECODE_STEPS = 32


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM(str(default_model_path), dtype="float32", kv_cache_dtype="fp32", kv_cache_memory_gb=0.5)


def check_against_hf(hf, token_ids, logits, num_prompt):
    with torch.no_grad():
        ref = hf(torch.tensor([token_ids[:-1]])).logits[0]
    assert logits.shape == ref.shape
    diff = (logits - ref).abs().max().item()
    assert diff < 1e-3, f"max abs logit diff {diff}"
    with torch.no_grad():
        hf_ids = hf.generate(
            torch.tensor([token_ids[:num_prompt]]),
            max_new_tokens=DECODE_STEPS,
            do_sample=False,
            min_new_tokens=DECODE_STEPS,
            pad_token_id=2,
        )[0].tolist()
    assert hf_ids == token_ids


def test_200_token_prompt_and_32_decode_steps_match_hf(llm, hf_default_model):
    prompt = llm.tokenizer.encode(sotu_text())[:200]
    [(token_ids, logits)] = run_recording_logits(llm, [prompt], DECODE_STEPS)
    assert len(token_ids) == 200 + DECODE_STEPS
    check_against_hf(hf_default_model, token_ids, logits, 200)


def test_batch_of_different_lengths_matches_hf(llm, hf_default_model):
    text = llm.tokenizer.encode(sotu_text())
    prompts = [text[1000:1037], text[3000:3150], text[5000:5009], text[7000:7090]]
    for prompt, (token_ids, logits) in zip(prompts, run_recording_logits(llm, prompts, DECODE_STEPS)):
        check_against_hf(hf_default_model, token_ids, logits, len(prompt))
    assert llm.stats()["kv_blocks_used"] == 0


def test_tokenization_matches_hf(llm, default_model_path):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)
    for text in ["The capital of France is", sotu_text()[:2000], "naïve café — 日本語 🙂"]:
        assert llm.tokenizer.encode(text) == hf_tok(text)["input_ids"]
    assert llm.tokenizer.encode("Hello")[0] != 1  # SmolLM2 adds no BOS
