import pytest
import torch

from ferrolm import LLM, SamplingParams
from ferrolm.engine.sampler import filter_logits


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(
        str(tiny_model_dir), dtype="float32", kv_cache_dtype="fp16", kv_cache_num_blocks=128, block_size=4
    )


def test_seeded_sampling_is_reproducible_across_batches(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["The people of"], p)[0].token_ids
    other = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batched = llm.generate(["Congress", "The people of", "war"], [other, p, other])[1].token_ids
    assert alone == batched


def test_different_seeds_differ(llm):
    outs = {
        tuple(
            llm.generate(["The"], SamplingParams(temperature=1.5, seed=s, max_tokens=16, ignore_eos=True))[
                0
            ].token_ids
        )
        for s in range(4)
    }
    assert len(outs) > 1


def test_n_completions(llm):
    out = llm.generate(["The"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[
        0
    ]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert out.text == out.outputs[0].text


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0, 0.0)).tolist() == [False, False, True, True, True]
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09 ...
    kept = ~torch.isinf(filter_logits(logits, -1, 0.7, 0.0))
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[0] < 0.7 < probs[:2].sum()
    kept = ~torch.isinf(filter_logits(logits, -1, 1.0, 0.2))
    assert kept.tolist() == [True, True, False, False, False]


def test_logprobs(llm):
    out = llm.generate(["The"], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.token_ids, lps):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values())  # greedy picks the most likely


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n must"),
        (dict(top_k=-5), "top_k"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_invalid_params(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_engine_limits_logprobs_and_token_ids(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="max_logprobs"):
        eng.check_request(3, SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match="logit_bias"):
        eng.check_request(3, SamplingParams(logit_bias={10_000: 1.0}))
    eng.check_request(3, SamplingParams(logprobs=20))


def _seq(tokens, prompt_len, **params):
    from ferrolm.engine.sequence import Sequence

    return Sequence(0, "r", 0, list(tokens), prompt_len, SamplingParams(**params), detok=None)


def test_penalties():
    from ferrolm.engine.sampler import apply_penalties

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = apply_penalties(logits, _seq([0, 1, 3], 1, repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.25]  # positive divided, negative multiplied
    # presence/frequency count only generated tokens (3 twice, 1 once; 0 is the prompt)
    pen = apply_penalties(logits, _seq([0, 3, 1, 3], 1, presence_penalty=0.5, frequency_penalty=0.25))
    assert pen.tolist() == [2.0, -2.75, 1.0, -0.5]
    assert apply_penalties(logits, _seq([0, 1], 1)) is logits
