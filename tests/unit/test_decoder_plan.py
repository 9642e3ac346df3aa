"""The decoder layers as one compiled loop == the Python layers, bit for bit."""

import pytest
import torch

from ferrolm import LLM, SamplingParams
from ferrolm.kernels import build
from ferrolm.kv.spec import spec_flags
from ferrolm.models.decoder_plan import why_not

pytestmark = pytest.mark.skipif(not build.load(), reason="compiled kernels unavailable here")


def _all_logits(llm, prompts, steps):
    """Greedy-decode `steps` tokens per prompt as one batch; every computed position's logits."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, params)
    rows = []
    while eng.has_unfinished():
        batch = eng.scheduler.schedule()
        out = eng.runner.execute(batch, all_logits=True)
        rows.append(out)
        for item, r in zip(batch, torch.split(out, [i.num_new_tokens for i in batch])):
            item.seq.num_computed += item.num_new_tokens
            if item.seq.num_computed == item.seq.num_tokens:
                eng._append_token(item.seq, int(r[-1].argmax()), None)
    for rid in ids:
        del eng.requests[rid]
    return torch.cat(rows)


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
    compiled = _all_logits(llm, prompts, 6)
    llm.engine.runner.plan = None  # the Python layers
    python = _all_logits(llm, prompts, 6)
    assert torch.equal(compiled, python)


def test_formats_with_staging_rows_run_the_python_layers(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_dtype="int4pc", kv_cache_memory_gb=0.01)
    eng = llm.engine
    assert "staging" in why_not(eng.model, eng.pool, eng.runner.backend)
    assert len(llm.generate(["The people"], SamplingParams(max_tokens=4))[0].token_ids) == 4
    assert eng.runner.plan is None
