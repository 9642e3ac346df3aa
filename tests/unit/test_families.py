"""Model families beyond Llama (models/families.py): tiny random models of each, saved as
HF safetensors folders, against HF transformers on the same weights, and every KV spec."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, _tiny_tokenizer
from recording import run_recording_logits

from ferrolm import LLM, SamplingParams

# Each family's tiny config: TINY's shapes, plus what makes the family itself.
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),  # q/k norms; head_dim != hidden/heads
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    # Gemma 3: local layers with a 12-token window (prompts of 40) and a global layer every 2nd
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=48,
            final_logit_softcapping=2.0,  # random logits reach past it: the tanh cap counts
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    import transformers

    cfg_name, model_name, extra = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**{**TINY, **extra})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # random biases and norm weights, so that they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer(TINY["vocab_size"]).save_pretrained(path)
    return request.param, path, model.float().eval()


def _chunked_fp32(path) -> LLM:
    """fp32 weights and cache; prompts longer than 16 tokens prefill in chunks."""
    return LLM(
        str(path),
        dtype="float32",
        kv_cache_dtype="fp32",
        kv_cache_num_blocks=64,
        block_size=16,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=16,
    )


def _assert_matches_hf(llm, hf, prompts, steps=6):
    """Every computed position's logits (ragged batch, greedy decode) equal HF's full forward."""
    for ids, logits in run_recording_logits(llm, prompts, steps=steps):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits, ref[: len(logits)], atol=1e-4, rtol=1e-4)


def test_logits_match_hf_over_a_ragged_batch_with_chunked_prefill(family_model):
    name, path, hf = family_model
    llm = _chunked_fp32(path)
    assert llm.engine.model.config.family == name
    _assert_matches_hf(llm, hf, [list(range(3, 43)), list(range(50, 80)), [7, 8, 9]])


@pytest.mark.parametrize(
    "kv", ["fp16", "bf16", "int8", "fp8", "fp8_e5m2", "int4", "int8/int4", "int4;0=fp16;-1=fp16"]
)
def test_every_kv_spec_runs_prefill_decode_prefix_hits_and_preemption(family_model, kv):
    from ferrolm.kv.spec import spec_flags

    name, path, _ = family_model
    flags = {k: v for k, v in spec_flags(kv).items() if v is not None}
    llm = LLM(str(path), dtype="float32", kv_cache_num_blocks=9, block_size=16, **flags)
    shared = list(range(3, 40))  # a 37-token prefix shared by the prompts: cache hits
    prompts = [shared + [41 + i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, params)  # 4 x 58 tokens > 9 blocks of 16: preemption
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["num_preemptions"] > 0, stats
    alone = llm.generate(prompts[:1], params)[0].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == alone  # batching, hits, preemption change nothing


@pytest.mark.parametrize("window", [1, 5, 16, 17])
@pytest.mark.parametrize("bs", [16, 128])
def test_sliding_window_in_every_backend(window, bs):
    """A query at p sees keys p - window + 1 .. p: the compiled CPU kernels (decode and tile
    paths) and the Triton kernels (interpreter, context split in two) against the torch
    reference, over decodes and prefill chunks with cached prefixes."""
    from ferrolm.attention import AttentionMetadata, CpuBackend, TorchBackend, TritonBackend
    from ferrolm.kv.pool import KvPool
    from ferrolm.kv.spec import KvSpec

    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(window)
    spec = KvSpec.build(1, "int8/int4", rotation="off")
    pool = KvPool(spec, 1, 2, 64, 12, bs)
    tables = [[0, 1, 2], [3, 4], [5, 6, 7, 8]] if bs == 16 else [[0], [1], [2]]
    starts, news = [40, 3, 20], [1, 20, 9]
    full = AttentionMetadata(tables, [0, 0, 0], [s + n for s, n in zip(starts, news)], bs)
    n = full.slot_mapping.numel()
    TorchBackend().write(
        pool, 0, full.slot_mapping, torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
    )
    meta = AttentionMetadata(tables, starts, news, bs)
    q = torch.randn(sum(news), 6, 64, generator=g)
    ref = TorchBackend().attend(q, 0, pool, meta, 0.125, window)
    assert not torch.allclose(ref, TorchBackend().attend(q, 0, pool, meta, 0.125))  # it matters
    torch.testing.assert_close(
        CpuBackend().attend(q, 0, pool, meta, 0.125, window), ref, atol=2e-5, rtol=2e-5
    )
    got = TritonBackend(splits=2).attend(q, 0, pool, meta, 0.125, window)
    torch.testing.assert_close(got, ref, atol=4e-3, rtol=0)


@pytest.mark.parametrize("start, new", [(1500, 1), (1400, 40)])
def test_sliding_window_over_a_split_context(start, new):
    """One long sequence (its context split between threads): the compiled kernels walk
    only the window's tiles (decode and tile paths), the splits share those, and the result
    is the reference's."""
    from ferrolm.attention import AttentionMetadata, CpuBackend, TorchBackend
    from ferrolm.kv.pool import KvPool
    from ferrolm.kv.spec import KvSpec

    g = torch.Generator().manual_seed(start)
    pool = KvPool(KvSpec.build(1, "int8", rotation="off"), 1, 2, 64, 100, 16)
    table = [list(range(99, -1, -1))[: -(-(start + new) // 16)]]  # scattered, newest first
    full = AttentionMetadata(table, [0], [start + new], 16)
    n = full.slot_mapping.numel()
    TorchBackend().write(
        pool, 0, full.slot_mapping, torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
    )
    meta = AttentionMetadata(table, [start], [new], 16)
    q = torch.randn(new, 6, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two kv heads, two threads: the context is split
    try:
        got = CpuBackend().attend(q, 0, pool, meta, 0.125, 600)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, TorchBackend().attend(q, 0, pool, meta, 0.125, 600), atol=2e-5, rtol=2e-5)


def test_mistral_sliding_window_matches_hf(tmp_path):
    """A window shorter than the prompts: chunked prefill and decode over it, against HF."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**{**TINY, "sliding_window": 8})
    hf = transformers.MistralForCausalLM(cfg).float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path)
    llm = _chunked_fp32(tmp_path)
    assert llm.engine.model.config.sliding_window == 8
    _assert_matches_hf(llm, hf, [list(range(3, 43)), list(range(50, 61))])


def test_unknown_architecture_lists_the_supported(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported \(supported: .*qwen3"):
        LLM(str(tmp_path))
