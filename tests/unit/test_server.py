"""The OpenAI-compatible server on the tiny model, driven by the official openai client."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import running_server

MODEL = "tiny"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(
        str(tiny_model_dir),
        served_name=MODEL,
        dtype="float32",
        kv_cache_dtype="int8",
        kv_cache_num_blocks=200,
        block_size=4,
        max_model_len=256,
    ) as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (
                f"{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()) if k != 'model_name')}}}"
                if any(k != "model_name" for k in s.labels)
                else ""
            )
            out[key] = s.value
    return out


def wait_idle(engine, timeout=10):
    deadline = time.monotonic() + timeout
    while engine.stats()["kv_blocks_used"] or engine.has_unfinished():
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)


def test_models_and_health(server, client):
    url, _ = server
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["kv_cache_dtype"] == "int8"
    assert httpx.get(url + "/health").status_code == 200


def test_completion_greedy_matches_engine_and_usage(server, client):
    _, engine = server
    r = client.completions.create(model=MODEL, prompt="The people of", max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("The people of"))
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    again = client.completions.create(model=MODEL, prompt="The people of", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL, prompt="Congress shall", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Congress shall",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_stream_and_n_and_seed(client):
    msgs = [{"role": "user", "content": "Tell me about the Union"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, n=3, temperature=1.0, seed=5)
    assert len(r.choices) == 3 and {c.index for c in r.choices} == {0, 1, 2}
    assert all(c.message.role == "assistant" for c in r.choices)
    r2 = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, n=3, temperature=1.0, seed=5
    )
    assert [c.message.content for c in r.choices] == [c.message.content for c in r2.choices]
    stream = list(
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, stream=True, temperature=0)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == greedy.choices[0].message.content


def test_stop_and_logprobs(client):
    free = client.completions.create(model=MODEL, prompt="The", max_tokens=20, temperature=0).choices[0].text
    stop = free[4:7]
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[: free.find(stop)]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy takes the top one
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=3, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 3


@pytest.mark.parametrize(
    "body,status,word",
    [
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 3}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "word " * 400}, 400, "max_model_len"),
        ({"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "seed"),
        ({"model": MODEL, "prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
        ({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "max_logprobs"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "n": 17}, 400, "max_n"),
        ({"model": MODEL, "prompt": ["x"] * 65}, 400, "max_prompts"),
        ({"model": MODEL, "prompt": "x", "stop": ["a"] * 17}, 400, "max_stop"),
        ({"model": MODEL, "prompt": "x", "stop": "a" * 257}, 400, "max_stop_len"),
        ({"model": MODEL, "prompt": "bad \ud800 text"}, 422, "Unicode"),
        ({"model": MODEL}, 422, "prompt"),
        ({"model": MODEL, "prompt": "x", "n": "many"}, 422, "n"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, word):
    url, engine = server
    r = httpx.post(url + "/v1/completions", content=json.dumps(body), headers=JSON)  # ASCII-escaped
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert word in err["message"] and err["code"] == status
    assert engine.stats()["kv_blocks_used"] == 0


def test_long_max_tokens_finishes_with_length_at_max_model_len(client, server):
    _, engine = server
    r = client.completions.create(
        model=MODEL, prompt="The", max_tokens=1000, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == engine.max_model_len


@pytest.mark.parametrize(
    "extra,status,word",
    [
        ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "max_logprobs"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, 422, "continuous_usage_stats"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"tool_choice": "auto"}, 400, "tool"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"functions": [{"name": "f"}]}, 400, "functions"),
        ({"messages": [{"role": "user", "content": "\udfff"}]}, 422, "Unicode"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "image"),
    ],
)
def test_chat_rejects_what_it_does_not_implement(server, extra, status, word):
    url, engine = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), headers=JSON)
    assert r.status_code == status, r.text
    assert word in r.json()["error"]["message"]
    assert engine.stats()["kv_blocks_used"] == 0


def test_accepted_extras_work(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        user="someone",
        response_format={"type": "text"},
        logit_bias={"42": 100},
    )
    assert r.choices[0].message.content  # forced token 42 three times
    echo = client.completions.create(model=MODEL, prompt="The people", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="The people", max_tokens=3, temperature=0)
    assert echo.choices[0].text == "The people" + plain.choices[0].text


def test_models_retrieve_and_docs_off(server, client):
    url, _ = server
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(url + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_malformed_json_and_unknown_route(server):
    url, _ = server
    r = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 422
    assert httpx.get(url + "/v1/nothing").status_code == 404


def test_metrics_move(server, client):
    url, engine = server
    first = metrics(url)
    assert first["ferrolm_kv_cache_info{kv_cache_dtype=int8}"] == 1
    assert first["ferrolm_kv_cache_bytes_per_token"] == engine.pool.bytes_per_token
    # The cache in use, read while a long streamed request is held open (its first chunk is
    # in, 200 tokens to go): a poll beside a short request could miss it altogether, the
    # tiny model generating 60 tokens between two polls. Closing the stream aborts it and
    # its blocks come back.
    stream = client.completions.create(
        model=MODEL,
        prompt="The " * 40,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    during = metrics(url)
    stream.close()
    assert during["ferrolm_kv_cache_usage_perc"] > 0
    used = during["ferrolm_kv_cache_used_bytes"]
    assert used > 0 and used % engine.pool.block_nbytes == 0
    for _ in range(500):
        if metrics(url)["ferrolm_kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.01)
    assert metrics(url)["ferrolm_kv_cache_usage_perc"] == 0

    before = metrics(url)
    client.completions.create(
        model=MODEL, prompt="The " * 40, max_tokens=60, temperature=0, extra_body={"ignore_eos": True}
    )
    after = metrics(url)
    assert after["ferrolm_generation_tokens_total"] - before["ferrolm_generation_tokens_total"] == 60
    assert after["ferrolm_prompt_tokens_total"] > before["ferrolm_prompt_tokens_total"]
    assert after["ferrolm_time_to_first_token_seconds_count"] > before.get(
        "ferrolm_time_to_first_token_seconds_count", 0
    )
    assert after["ferrolm_time_per_output_token_seconds_count"] >= 59


def test_client_disconnect_aborts_and_frees_blocks(server):
    url, engine = server

    async def go():
        async with httpx.AsyncClient() as c:
            body = {
                "model": MODEL,
                "prompt": "The",
                "max_tokens": 200,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0,
            }
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        n += 1
                    if n == 3:
                        break  # leave mid-stream
            return n

    assert asyncio.run(go()) == 3
    wait_idle(engine)
    assert engine.stats()["kv_blocks_used"] == 0


def test_16_concurrent_streams_complete(server):
    url, engine = server
    prompts = [f"The {w} of the" for w in ("people", "Senate", "war", "House") * 4]

    async def one(c, p):
        body = {
            "model": MODEL,
            "prompt": p,
            "max_tokens": 10,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        text = ""
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    texts = asyncio.run(go())
    expected = {
        p: httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
            timeout=60,
        ).json()["choices"][0]["text"]
        for p in set(prompts)
    }
    assert texts == [expected[p] for p in prompts]
    wait_idle(engine)


def test_api_key(tiny_model_dir):
    with running_server(
        str(tiny_model_dir), served_name=MODEL, api_key="s3cret", dtype="float32", kv_cache_memory_gb=0.01
    ) as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert (
            httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
        )
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()


def test_split_per_layer_spec_is_served_and_shown(tiny_model_dir):
    flags = dict(
        dtype="float32",
        kv_cache_dtype="int8",
        kv_cache_value_dtype="int4",
        kv_cache_layer_dtypes="-1=fp16",
        kv_cache_num_blocks=64,
        block_size=4,
    )
    with running_server(str(tiny_model_dir), served_name=MODEL, **flags) as (url, engine):
        spec = "int8/int4, layers 1: fp16"
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert c.models.list().data[0].model_extra["kv_cache_dtype"] == spec
        m = metrics(url)
        assert m[f"ferrolm_kv_cache_info{{kv_cache_dtype={spec}}}"] == 1
        assert m["ferrolm_kv_cache_bytes_per_token"] == 2 * (66 + 36) + 2 * (128 + 128)  # 2 kv heads
        r = c.completions.create(model=MODEL, prompt="The people of", max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and engine.stats()["kv_dtype"] == spec
