"""LLMEngine on the tiny model: continuous batching, chunked prefill, preemption,
prefix caching, abort and streaming, each compared with an undisturbed run."""

import pytest

from ferrolm import KvCacheDtype, LLMEngine, SamplingParams
from ferrolm.config import EngineConfig
from ferrolm.kv.spec import KvSpec, spec_flags

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = {
    "a": list(range(10, 47)),
    "b": list(range(100, 109)),
    "c": list(range(200, 260)),
    "d": [7, 8, 9, 10, 11],
}


def make_engine(tiny_model_dir, **flags) -> LLMEngine:
    base = dict(
        model=str(tiny_model_dir),
        dtype="float32",
        kv_cache_dtype="fp32",
        kv_cache_num_blocks=256,
        block_size=4,
    )
    return LLMEngine(EngineConfig().with_flags({**base, **flags}))


def run_all(engine, requests, schedule=None):
    """Add requests (at the step given in `schedule`, else at once) and run to the end."""
    schedule = schedule or {}
    pending = dict(requests)
    final = {}
    step = 0
    while pending or engine.has_unfinished():
        for rid in [r for r in pending if schedule.get(r, 0) <= step]:
            engine.add_request(rid, *pending.pop(rid))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    return final


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    eng = make_engine(tiny_model_dir, enable_prefix_caching=False)
    return {rid: run_all(eng, {rid: (p, GREEDY)})[rid].token_ids for rid, p in PROMPTS.items()}


@pytest.mark.parametrize("max_batched", [512, 7])
def test_joining_and_leaving_does_not_change_output(tiny_model_dir, alone, max_batched):
    eng = make_engine(tiny_model_dir, max_num_batched_tokens=max_batched, enable_prefix_caching=False)
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    reqs = {rid: (p, GREEDY) for rid, p in PROMPTS.items()}
    reqs["early-leaver"] = ([5, 6, 7], short)
    final = run_all(eng, reqs, schedule={"b": 2, "c": 5, "d": 9, "early-leaver": 1})
    for rid in PROMPTS:
        assert final[rid].token_ids == alone[rid], rid
    assert eng.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_sequences_continue_exactly(tiny_model_dir, alone, prefix_caching):
    # 24 blocks of 4 = 96 tokens; the four requests need 61+29+80+25 at the end.
    eng = make_engine(tiny_model_dir, kv_cache_num_blocks=24, enable_prefix_caching=prefix_caching)
    final = run_all(eng, {rid: (p, GREEDY) for rid, p in PROMPTS.items()})
    assert eng.stats()["num_preemptions"] > 0
    for rid in PROMPTS:
        assert final[rid].token_ids == alone[rid], rid
    assert eng.stats()["kv_blocks_used"] == 0 or prefix_caching is False


SPLIT_AND_LAYERED = ["int8/int4", "int4;0=fp16;-1=bf16/fp8", "int4pc/int4", "int4pc;0=fp16"]


@pytest.mark.parametrize("spec", SPLIT_AND_LAYERED)
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_equals_undisturbed_for_split_and_per_layer_specs(tiny_model_dir, spec, prefix_caching):
    flags = dict(spec_flags(spec), enable_prefix_caching=False)
    calm = make_engine(tiny_model_dir, **flags)
    undisturbed = {rid: run_all(calm, {rid: (p, GREEDY)})[rid].token_ids for rid, p in PROMPTS.items()}
    eng = make_engine(
        tiny_model_dir, **{**flags, "enable_prefix_caching": prefix_caching}, kv_cache_num_blocks=24
    )
    final = run_all(eng, {rid: (p, GREEDY) for rid, p in PROMPTS.items()})
    assert eng.stats()["num_preemptions"] > 0 and eng.stats()["kv_dtype"] == KvSpec.parse(spec, 2).describe()
    for rid in PROMPTS:
        assert final[rid].token_ids == undisturbed[rid], rid


@pytest.mark.parametrize("spec", [d.value for d in KvCacheDtype] + SPLIT_AND_LAYERED)
def test_prefix_cache_hit_equals_miss(tiny_model_dir, spec):
    system = list(range(30, 70))  # a 40-token shared prefix: 10 full blocks
    prompts = {"first": system + [1, 2, 3], "second": system + [4, 5, 6, 7]}
    miss = make_engine(tiny_model_dir, **spec_flags(spec), enable_prefix_caching=False)
    expected = {rid: run_all(miss, {rid: (p, GREEDY)})[rid].token_ids for rid, p in prompts.items()}
    eng = make_engine(tiny_model_dir, **spec_flags(spec), enable_prefix_caching=True)
    first = run_all(eng, {"first": (prompts["first"], GREEDY)})
    before = eng.stats()["prefix_cache_hits"]
    second = run_all(eng, {"second": (prompts["second"], GREEDY)})
    stats = eng.stats()
    assert stats["prefix_cache_hits"] - before == 40
    assert stats["prefix_cache_queries"] == len(prompts["first"]) + len(prompts["second"])
    assert first["first"].token_ids == expected["first"]
    assert second["second"].token_ids == expected["second"]


def test_abort_and_mixed_endings_return_every_block(tiny_model_dir):
    eng = make_engine(tiny_model_dir, kv_cache_num_blocks=20, enable_prefix_caching=True)
    initial_free = eng.blocks.num_free
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, GREEDY)
    eng.add_request(
        "n3", [3, 4, 5], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)
    )
    for _ in range(6):
        eng.step()
    out = eng.abort("c")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.abort("no-such-request") is None
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["num_preemptions"] > 0
    assert eng.blocks.num_free == initial_free and all(r == 0 for r in eng.blocks.ref_counts)
    assert eng.requests == {}


def test_streaming_deltas_add_up_to_the_text(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    eng.add_request("s", "The people of the United States", SamplingParams(temperature=0.0, max_tokens=25))
    deltas, last = [], None
    while eng.has_unfinished():
        for out in eng.step():
            deltas.append(out.outputs[0].delta_text)
            last = out
    assert "".join(deltas) == last.text
    assert last.text == eng.tokenizer.decode(last.token_ids)


def test_incremental_detokenizer_never_splits_characters(tiny_model_dir):
    from ferrolm.tokenizer import IncrementalDetokenizer

    eng = make_engine(tiny_model_dir)
    text = "naïve café — 日本語 and emoji 🙂🚀 done"
    ids = eng.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    detok = IncrementalDetokenizer(eng.tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_fast_decode_equals_the_wrappers_decode(tiny_model_dir):
    """The tokenizer's own decode (the wrapper's argument handling skipped) gives the
    wrapper's text for every span, special tokens kept or skipped; a tokenizer that cleans
    up spaces keeps the wrapper's decode."""
    from ferrolm.tokenizer import Tokenizer

    tok = make_engine(tiny_model_dir).tokenizer
    assert tok._fast_decode is not None
    ids = tok.encode("naïve café — 日本語, don't stop 🙂") + sorted(tok.eos_token_ids)
    for a in range(len(ids)):
        for b in range(a, len(ids) + 1):
            for skip in (True, False):
                assert tok.decode(ids[a:b], skip) == tok.hf.decode(ids[a:b], skip_special_tokens=skip)
    tok.hf.clean_up_tokenization_spaces = True
    assert Tokenizer(tok.hf)._fast_decode is None


def test_stop_strings_are_cut_and_not_included(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    free_run = run_all(
        eng, {"x": ("The people", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))}
    )
    text = free_run["x"].text
    stop = text[8:11]
    assert len(stop) == 3
    eng.add_request("y", "The people", SamplingParams(temperature=0.0, max_tokens=30, stop=[stop, "zzzz"]))
    deltas = []
    while eng.has_unfinished():
        for o in eng.step():
            deltas.append(o.outputs[0].delta_text)
            out = o
    assert out.outputs[0].finish_reason == "stop"
    assert out.text == text[: text.find(stop)] and stop not in out.text
    assert "".join(deltas) == out.text  # nothing of the stop string was streamed first


def test_max_model_len_ends_generation(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_model_len=20)
    out = run_all(
        eng, {"x": (list(range(3, 18)), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))}
    )
    assert out["x"].outputs[0].finish_reason == "length" and len(out["x"].token_ids) == 5


def test_invalid_request_allocates_nothing(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", [1, 2], GREEDY)
        eng.add_request("dup", [1, 2], GREEDY)
    eng.abort("dup")
    with pytest.raises(ValueError, match="top_p"):
        params = SamplingParams()
        params.top_p = 2.0  # set after construction: add_request validates again
        eng.add_request("bad", [1, 2], params)
    assert eng.blocks.num_used == 0 and not eng.has_unfinished()


@pytest.mark.parametrize("max_batched", [512, 7])
def test_per_channel_keys_alone_equals_batched_and_releases_staging(tiny_model_dir, max_batched):
    """int4pc reads a query's own block from fp16 staging and earlier blocks from their codes,
    so joining, leaving and chunking change nothing; every staging row comes back."""
    flags = spec_flags("int4pc/int4")
    calm = make_engine(tiny_model_dir, **flags, enable_prefix_caching=False)
    alone = {rid: run_all(calm, {rid: (p, GREEDY)})[rid].token_ids for rid, p in PROMPTS.items()}
    eng = make_engine(
        tiny_model_dir, **flags, enable_prefix_caching=False, max_num_batched_tokens=max_batched
    )
    final = run_all(eng, {rid: (p, GREEDY) for rid, p in PROMPTS.items()}, schedule={"b": 2, "c": 5, "d": 9})
    assert {rid: out.token_ids for rid, out in final.items()} == alone
    assert len(eng.pool._free_rows) == eng.pool.staging_rows and (eng.pool.row_of < 0).all()


def test_budget_eaten_by_staging_is_explained(tiny_model_dir):
    with pytest.raises(ValueError, match="staging rows"):
        make_engine(
            tiny_model_dir, **spec_flags("int4pc"), kv_cache_num_blocks=None, kv_cache_memory_gb=0.0001
        )


def test_a_prompt_waits_for_room_for_all_of_it(tiny_model_dir, alone):
    """26 blocks of 4: "c" (60 prompt tokens) holds 20 blocks at its end. "a" (37 tokens,
    10 blocks) arrives while c decodes with 16 blocks, so 10 are free and the watermark
    keeps 1: a waits for c, instead of being admitted on its first 7-token chunk and
    growing into c's room (the old rule: a preemption)."""
    eng = make_engine(tiny_model_dir, kv_cache_num_blocks=26, max_num_batched_tokens=7)
    waited = []
    requests = {rid: (PROMPTS[rid], GREEDY) for rid in ("c", "a")}
    final = {}
    for rid, args in requests.items():
        eng.add_request(rid, *args)
        for _ in range(12 if rid == "c" else 0):  # c: prefill (9 chunks), then decodes
            for out in eng.step():
                final[out.request_id] = out
    while eng.has_unfinished():
        for out in eng.step():
            final[out.request_id] = out
        running = {s.request_id for s in eng.scheduler.running}
        waited.append("a" not in running and "c" in running)
    assert eng.stats()["num_preemptions"] == 0 and any(waited)
    assert final["c"].outputs[0].token_ids == alone["c"] and final["a"].outputs[0].token_ids == alone["a"]
