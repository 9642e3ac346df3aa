"""The llama.cpp peer of `ferrolm bench` (runs where the optional extra is installed)."""

import pytest

pytest.importorskip("llama_cpp", reason="the optional extra ferrolm[llamacpp] is not installed")

from ferrolm import LLM, SamplingParams  # noqa: E402
from ferrolm.data import sample_text  # noqa: E402
from ferrolm.eval.llamacpp import LlamaCpp  # noqa: E402

pytestmark = pytest.mark.integration


def test_batched_sequences_are_independent_and_agree_with_ferrolm(default_model_path):
    """Three sequences decoded in one batch each give what they give alone, and greedy
    decoding starts where ferrolm's does (same GGUF; llama.cpp quantizes activations to
    8 bits for its Q4_1 dot products, so only the first tokens are compared)."""
    llm = LLM(str(default_model_path), dtype="float32", kv_cache_memory_gb=0.1)
    ids = llm.tokenizer.encode(sample_text())
    prompts = [ids[i * 50 : i * 50 + 20 + 7 * i] for i in range(3)]
    lc = LlamaCpp(str(default_model_path), "f16", n_seq=3, seq_ctx=128, threads=2)
    try:
        last, _ = lc.prefill(prompts)
        together = [[t] for t in last]
        pos = [len(p) for p in prompts]
        for _ in range(5):
            last = lc.step(last, pos)
            pos = [p + 1 for p in pos]
            for seq, t in zip(together, last):
                seq.append(t)
        for i, p in enumerate(prompts):
            lc.reset()
            (tok,), _ = lc.prefill([p])
            alone = [tok]
            for step in range(5):
                alone.append(lc.step([alone[-1]], [len(p) + step])[0])
            assert alone == together[i]
        timing = lc.generate(prompts, 4)
        assert timing["tokens_per_s"] > 0 and timing["tpot_s"] > 0
        assert lc.decode_step_time(prompts, 3) > 0 and lc.prefill_time(prompts[0]) > 0
    finally:
        lc.close()
    ours = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2))
    assert [o.token_ids[:2] for o in ours] == [t[:2] for t in together]
