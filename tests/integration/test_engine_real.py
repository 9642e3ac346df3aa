"""Engine features on the real default model, for every KV dtype."""

import pytest
from click.testing import CliRunner

from ferrolm import LLM, KvCacheDtype, SamplingParams
from ferrolm.cli import app

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_prefix_cache_hit_equals_miss(default_model_path, dtype):
    """Two chats share the template's system prompt: the second reuses its cached blocks."""
    params = SamplingParams(temperature=0.0, max_tokens=12)
    # blocks of 16: the two chats share a 24-token system prompt (the default 128 caches none)
    kw = dict(dtype="float32", kv_cache_dtype=dtype.value, kv_cache_memory_gb=0.1, block_size=16)
    miss = LLM(str(default_model_path), enable_prefix_caching=False, **kw)
    chats = [
        miss.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        for q in ("What is the capital of France?", "Name a primary color.")
    ]
    expected = [miss.generate([c], params)[0].token_ids for c in chats]
    llm = LLM(str(default_model_path), enable_prefix_caching=True, **kw)
    got = [llm.generate([c], params)[0].token_ids for c in chats]
    assert got == expected
    stats = llm.stats()
    shared = next(i for i, (a, b) in enumerate(zip(*chats)) if a != b)
    assert stats["prefix_cache_hits"] == shared // 16 * 16 > 0
    assert stats["prefix_cache_queries"] == len(chats[0]) + len(chats[1])


def test_cli_chat(default_model_path):
    res = CliRunner().invoke(
        app,
        [
            "run",
            "--chat",
            "--prompt",
            "What is the capital of France? Answer in one sentence.",
            "--max-tokens",
            "24",
            "--json",
            "--kv-cache-dtype",
            "int8",
            "--kv-cache-memory-gb",
            "0.05",
            "--dtype",
            "float32",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_readme_question_with_defaults_answers_paris(dtype):
    """The README's first example, with every default (compute dtype auto picks bf16 or
    fp32 by CPU, so both are checked explicitly too). bf16-rounded logits once turned
    this 0.08-nat lead into "L'Étoile, la Marseillaise..."."""
    args = ["run", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "16"]
    res = CliRunner().invoke(app, args + (["--dtype", dtype] if dtype else []))
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout, res.stdout


@pytest.mark.parametrize("kv", ["fp16", "int8", "int4"])
def test_compiled_layer_loop_equals_the_python_layers_on_shipped_weights(default_model_path, kv):
    """The default model as shipped (4-bit layers, compute dtype auto), a ragged batch: the
    compiled layer loop and the Python layers give the same tokens and log-probabilities."""
    from ferrolm.kernels import build

    if not build.load():
        pytest.skip("compiled kernels unavailable here")
    llm = LLM(str(default_model_path), kv_cache_dtype=kv, kv_cache_memory_gb=0.1)
    assert llm.engine.runner.plan is not None
    prompts = [
        "The capital of France is",
        "Fellow-Citizens of the Senate and of the House of Representatives:",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, ignore_eos=True)
    compiled = llm.generate(prompts, params)
    llm.engine.runner.plan = None
    python = llm.generate(prompts, params)
    for a, b in zip(compiled, python):
        assert a.token_ids == b.token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
