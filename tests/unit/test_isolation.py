"""One request's failure (its logits, its sampling) finishes only that request with an
error; the others in the same steps finish exactly as in an undisturbed run."""

import pytest
import torch
from test_engine import GREEDY, PROMPTS, make_engine, run_all

import ferrolm.engine.engine as engine_mod
from ferrolm import SamplingParams

POISON = 333  # a token id only the poisoned request's prompt holds


@pytest.fixture(scope="module")
def undisturbed(tiny_model_dir):
    eng = make_engine(tiny_model_dir, enable_prefix_caching=False)
    return {
        rid: out.token_ids for rid, out in run_all(eng, {r: (p, GREEDY) for r, p in PROMPTS.items()}).items()
    }


def _requests():
    reqs = {rid: (p, GREEDY) for rid, p in PROMPTS.items()}
    reqs["poison"] = ([5, POISON, 6, 7], SamplingParams(temperature=0.0, max_tokens=20, n=2, ignore_eos=True))
    return reqs


def _check(eng, final, undisturbed):
    bad = final["poison"]
    assert bad.finished and bad.error and {c.finish_reason for c in bad.outputs} == {"error"}
    for rid in PROMPTS:
        assert final[rid].error is None and final[rid].token_ids == undisturbed[rid], rid
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished()


@pytest.mark.parametrize("max_batched", [512, 7])
def test_model_failure_of_one_request_spares_the_others(
    tiny_model_dir, undisturbed, monkeypatch, max_batched
):
    eng = make_engine(tiny_model_dir, enable_prefix_caching=False, max_num_batched_tokens=max_batched)
    real = eng.runner.execute

    def execute(batch, *args, **kw):
        if any(POISON in item.seq.token_ids for item in batch):
            raise RuntimeError("injected failure in the forward pass")
        return real(batch, *args, **kw)

    monkeypatch.setattr(eng.runner, "execute", execute)
    final = run_all(eng, _requests(), schedule={"poison": 2})
    _check(eng, final, undisturbed)
    assert "injected failure" in final["poison"].error


def test_sampling_failure_of_one_request_spares_the_others(tiny_model_dir, undisturbed, monkeypatch):
    eng = make_engine(tiny_model_dir, enable_prefix_caching=False)
    real = engine_mod.sample

    def sample(logits, seqs):
        if any(s.request_id == "poison" for s in seqs):
            raise RuntimeError("injected failure in sampling")
        return real(logits, seqs)

    monkeypatch.setattr(engine_mod, "sample", sample)
    final = run_all(eng, _requests(), schedule={"poison": 1})
    _check(eng, final, undisturbed)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1e-38),  # below the greedy floor
        dict(temperature=1e-5, top_p=0.5),
        dict(temperature=1.0, repetition_penalty=1e-300),
        dict(temperature=1e-5, repetition_penalty=1e300, presence_penalty=2, frequency_penalty=-2),
        dict(temperature=1.0, logit_bias={7: 100.0, 8: -100.0}),
        dict(temperature=1.0, seed=2**64 - 1),
        dict(temperature=1.0, seed=-(2**63)),
    ],
)
def test_every_accepted_value_samples_finite(tiny_model_dir, params):
    eng = make_engine(tiny_model_dir)
    p = SamplingParams(max_tokens=8, n=2, ignore_eos=True, **params)
    final = run_all(eng, {"x": (list(range(10, 30)), p)})
    out = final["x"]
    assert out.error is None and all(len(c.token_ids) == 8 for c in out.outputs)


def test_tiny_temperature_is_greedy(tiny_model_dir, undisturbed):
    eng = make_engine(tiny_model_dir)
    p = SamplingParams(temperature=1e-38, max_tokens=20, ignore_eos=True)
    assert run_all(eng, {"a": (PROMPTS["a"], p)})["a"].token_ids == undisturbed["a"]


def test_logit_bias_forces_a_token(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    p = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={42: 100.0})
    assert run_all(eng, {"x": ([10, 11, 12], p)})["x"].token_ids == [42] * 5


@pytest.mark.parametrize(
    "bad",
    [
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(temperature=float("inf")),
        dict(temperature=float("nan")),
        dict(repetition_penalty=float("inf")),
        dict(logit_bias={1: 101}),
    ],
)
def test_unsafe_values_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_nan_logits_fail_only_that_row(tiny_model_dir):
    from ferrolm.engine.sampler import sample

    eng = make_engine(tiny_model_dir)
    eng.add_request("x", [1, 2, 3], SamplingParams(temperature=1.0))
    seq = eng.requests["x"].seqs[0]
    with pytest.raises(RuntimeError):
        sample(torch.full((1, 384), float("nan")), [seq])
    eng.abort("x")
