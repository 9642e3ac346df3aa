"""Sliding-window layers keep only their window: KV groups (kv/groups.py), the block
manager's per-group tables (kv/blocks.py), and a tiny Gemma 3 whose local layers drop
the blocks that left their window, against HF transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, _tiny_tokenizer
from recording import run_recording_logits
from test_blocks import Seq

from ferrolm import LLM, SamplingParams
from ferrolm.kv.blocks import BlockManager
from ferrolm.kv.groups import KvGroups
from ferrolm.kv.spec import KvSpec

GEMMA_270M = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]  # 5 local : 1 global


def test_gemma_pattern_makes_groups_of_three_layers():
    g = KvGroups.plan(GEMMA_270M, KvSpec.parse("int8", 18))
    assert g.group_size == 3 and g.windows == (512,) * 5 + (None,)
    assert [i for i in range(18) if g.layer_group[i] == 5] == [5, 11, 17]  # the global layers
    for k in range(3):  # each slot's tensors serve one layer of every group
        assert sorted(g.layer_group[i] for i in range(18) if g.layer_slot[i] == k) == list(range(6))


def test_other_layer_counts_and_kinds():
    one_b = [None if (i + 1) % 6 == 0 else 512 for i in range(26)]  # Gemma 3 1B: 22 local, 4 global
    g = KvGroups.plan(one_b, KvSpec.parse("fp16", 26))
    assert g.group_size == 2 and g.num_groups == 13 and g.windows.count(None) == 2
    mistral = KvGroups.plan([4096] * 4, KvSpec.parse("fp16", 4))
    assert mistral.windows == (4096,) and mistral.group_size == 4
    plain = KvGroups.plan([None] * 4, KvSpec.parse("fp16", 4))
    assert plain == KvGroups.single(4) and not plain.frees_windows


def test_a_per_layer_spec_mixing_formats_in_a_slot_keeps_all_blocks():
    g = KvGroups.plan(GEMMA_270M, KvSpec.parse("int8;0=fp16", 18))
    assert g.num_groups == 1 and not g.frees_windows and "kept" in g.note
    # Formats that line up with the slots still free windows.
    assert KvGroups.plan(GEMMA_270M, KvSpec.parse("int8;5=fp16;11=fp16;17=fp16", 18)).num_groups == 1
    slots = KvGroups.plan(GEMMA_270M, KvSpec.parse("int8", 18)).layer_slot
    aligned = "int8;" + ";".join(f"{i}=fp16" for i in range(18) if slots[i] == 0)
    assert KvGroups.plan(GEMMA_270M, KvSpec.parse(aligned, 18)).num_groups == 6


def test_window_groups_release_blocks_that_left_every_window():
    bm = BlockManager(num_blocks=32, block_size=4, windows=(8, None))
    assert bm.num_usable == 31 and bm.null_block == 0  # the null block is never handed out
    seq = Seq(token_ids=list(range(40)))
    bm.grow(seq, 40)
    seq.num_computed = 40
    assert bm.num_used == 20
    # The next query (position 40) sees keys 33..40: blocks 8 (32..35) and 9 of the window group.
    assert bm.release_out_of_window(seq) == 8
    assert seq.block_tables[0] == [0] * 8 + seq.block_tables[0][8:] and 0 not in seq.block_tables[1]
    assert bm.num_used == 12 and bm.release_out_of_window(seq) == 0
    bm.grow(seq, 41)  # one more block in each group
    assert bm.num_used == 14
    bm.free(seq)
    assert bm.num_used == 0 and sorted(bm.free_ids) == list(range(1, 32))


def test_growing_from_a_late_position_allocates_only_the_window():
    bm = BlockManager(num_blocks=32, block_size=4, windows=(8, None))
    seq = Seq(token_ids=list(range(48)), num_computed=40)
    seq.block_tables = [[0] * 8 + [5, 6], [7] * 10]  # window group already dropped 0..7
    assert bm.extra_blocks(seq, 48) == 2 + 2
    assert bm.max_blocks(10_000, chunk=16) == 2500 + 7  # (8 - 1 + 16) tokens span 7 blocks


def _run(bm, tokens):
    seq = Seq(token_ids=list(tokens))
    prefix = bm.lookup(seq.token_ids)
    bm.take_cached(seq, prefix)
    bm.grow(seq, len(tokens))
    seq.num_computed = len(tokens)
    bm.register_full_blocks(seq)
    bm.release_out_of_window(seq)
    return seq, prefix


def test_a_prefix_hit_needs_only_the_window_groups_last_window():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True, windows=(8, None))
    a, _ = _run(bm, range(40))
    b, hit = _run(bm, list(range(40)) + [99])
    assert hit.num_blocks == 10  # all 40 tokens: the window blocks 8, 9 are still held by a
    assert hit.tables[0][:8] == [0] * 8 and hit.tables[0][8:] == a.block_tables[0][8:]
    assert hit.tables[1] == a.block_tables[1]
    bm.free(a)
    bm.free(b)
    # Blocks 0..7 of the window group were released long ago; they are not needed for a hit
    # at 40, and a hit at 20 would need window blocks 3, 4 too, which are still cached.
    assert bm.lookup(list(range(21))).num_blocks == 5


def test_a_missing_window_block_shortens_the_hit():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True, windows=(8, None))
    a, _ = _run(bm, range(40))
    last_window_block = a.block_tables[0][9]
    bm.free(a)
    bm._forget(last_window_block)  # window block 9 evicted: a hit at 40 cannot resume the window
    hit = bm.lookup(list(range(41)))
    assert hit.num_blocks == 9 and hit.tables[0][-2:] != [0, 0]


# --- a tiny Gemma 3 with the real model's pattern: 5 local layers, then a global one ---------
@pytest.fixture(scope="module")
def gemma6(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("gemma6")
    torch.manual_seed(0)
    types = ["sliding_attention"] * 5 + ["full_attention"]
    cfg = transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 6},
        sliding_window=8,
        layer_types=types,
        query_pre_attn_scalar=48,
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer(TINY["vocab_size"]).save_pretrained(path)
    return path, model.float().eval()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_local_layers_drop_blocks_and_still_match_hf(gemma6, backend):
    path, hf = gemma6
    llm = LLM(
        str(path),
        attention_backend=backend,
        dtype="float32",
        kv_cache_dtype="fp32",
        kv_cache_num_blocks=64,
        block_size=4,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=10,
    )
    eng = llm.engine
    # 5 local : 1 global layers -> six groups of one layer (the 270M's 15 : 3 makes three)
    assert eng.kv_groups.windows == (8,) * 5 + (None,) and eng.kv_groups.group_size == 1
    prompts = [list(range(3, 53)), list(range(60, 71)), [7, 8, 9]]
    for ids, logits in run_recording_logits(llm, prompts, steps=6):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits, ref[: len(logits)], atol=1e-4, rtol=1e-4)


def test_a_long_sequence_holds_its_window_on_local_layers(gemma6):
    """56 tokens in blocks of 4: the global group keeps 14 blocks, each local one 2 (the
    next query sees keys 49..56); the used bytes follow."""
    path, _ = gemma6
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="int8", kv_cache_num_blocks=40, block_size=4)
    eng = llm.engine
    eng.add_request("r", list(range(3, 53)), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stats = None
    while stats is None:
        eng.step()
        if eng.scheduler.running[0].num_computed == 56:
            stats = eng.stats()
    # 40 blocks of 6 layers = 240 of one, and the null block in the pool
    assert stats["kv_blocks_total"] == 240
    assert stats["kv_block_bytes"] == eng.pool.bytes_per_token * 4 // 6
    assert stats["kv_blocks_used"] == 14 + 5 * 2
    assert stats["kv_used_bytes"] == 24 * stats["kv_block_bytes"]
    assert stats["kv_pool_bytes"] == 241 * stats["kv_block_bytes"]


def test_windows_let_a_request_longer_than_the_cache_run(gemma6):
    """The cache holds 28 tokens of every layer; a local group needs only its window (4
    blocks with steps of 4 tokens), so a 40-token request fits: 10 + 5 x 4 of 42 blocks."""
    path, hf = gemma6
    llm = LLM(
        str(path),
        dtype="float32",
        kv_cache_dtype="fp32",
        kv_cache_num_blocks=7,
        block_size=4,
        max_num_batched_tokens=4,
    )
    assert llm.engine.blocks.num_usable == 42
    prompt = list(range(3, 33))
    out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0]
    assert prompt + out[0].outputs[0].token_ids == ref.tolist()
    # One sequence may reach 88 tokens: 22 global blocks + 5 x 4 local ones; the cache holds
    # 28 tokens of every layer.
    eng = llm.engine
    assert eng.pool.capacity_tokens == 28 and eng.max_sequence_tokens == 88
    eng.check_request(30, SamplingParams(max_tokens=58))
    with pytest.raises(ValueError, match="more than the whole cache holds \\(88 tokens\\)"):
        eng.check_request(30, SamplingParams(max_tokens=59))


@pytest.mark.parametrize("kv", ["int8", "fp8", "int4pc/int4", "int8/int4"])
def test_windowed_groups_with_prefix_hits_and_preemption_change_nothing(gemma6, kv):
    """Four prompts sharing a 37-token prefix (past the 8-token window) in a cache too
    small for all of them: prefix hits, window blocks dropped, preemption; each output
    equals the prompt run alone. int4pc keys stage a block being filled per group."""
    from ferrolm.kv.pool import staging_bytes
    from ferrolm.kv.spec import spec_flags

    path, _ = gemma6
    flags = {k: v for k, v in spec_flags(kv).items() if v is not None}
    llm = LLM(str(path), dtype="float32", kv_cache_num_blocks=5, block_size=16, **flags)
    eng = llm.engine
    if eng.pool.staging_rows:  # the budget counted what the pool holds
        rows = eng.pool.staging_rows // eng.kv_groups.num_groups
        cfg = eng.model.config
        assert eng.pool.staging_nbytes() == staging_bytes(
            eng.kv_spec, cfg.num_kv_heads, cfg.head_dim, 16, rows
        )
    shared = list(range(3, 40))
    prompts = [shared + [41 + i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params)
    stats = eng.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["num_preemptions"] > 0, stats
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == llm.generate([p], params)[0].outputs[0].token_ids
