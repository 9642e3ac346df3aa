"""The decoder layers as one compiled loop == the Python layers, bit for bit."""

import pytest
import torch
from recording import run_recording_logits

from ferrolm import LLM, SamplingParams
from ferrolm.kernels import build
from ferrolm.kv.spec import spec_flags
from ferrolm.models.decoder_plan import why_not

pytestmark = pytest.mark.skipif(not build.load(), reason="compiled kernels unavailable here")


@pytest.mark.parametrize(
    "kv,dtype",
    [
        ("fp32", "float32"),
        ("fp16", "float32"),
        ("int8", "float32"),
        ("int8+norot", "bfloat16"),
        ("fp8", "bfloat16"),
        ("int4", "float32"),
        ("nf4", "bfloat16"),
        ("fp16;0=int8", "bfloat16"),
    ],
)
def test_compiled_loop_equals_the_python_layers(tiny_model_dir, kv, dtype):
    """Ragged batch, chunked prefill (7 tokens a step), then decode: identical logits."""
    llm = LLM(
        str(tiny_model_dir),
        dtype=dtype,
        **spec_flags(kv),
        kv_cache_num_blocks=64,
        block_size=4,
        max_num_batched_tokens=7,
    )
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9)]
    assert llm.engine.runner.plan is not None
    compiled = run_recording_logits(llm, prompts, 6)
    llm.engine.runner.plan = None  # the Python layers
    python = run_recording_logits(llm, prompts, 6)
    for (ids_c, logits_c), (ids_p, logits_p) in zip(compiled, python):
        assert ids_c == ids_p
        assert torch.equal(logits_c, logits_p)


def test_formats_with_staging_rows_run_the_python_layers(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_dtype="int4pc", kv_cache_memory_gb=0.01)
    eng = llm.engine
    assert "staging" in why_not(eng.model, eng.pool, eng.runner.backend)
    assert len(llm.generate(["The people"], SamplingParams(max_tokens=4))[0].token_ids) == 4
    assert eng.runner.plan is None
