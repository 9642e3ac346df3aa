"""A real server on the tiny model against hostile and careless clients: poisoned
requests next to healthy streams, clients that give up, oversized bodies, slow
requests past the timeout, huge prompts while others wait for /health."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from serving import running_server

MODEL = "tiny"
JSON = {"content-type": "application/json"}
POISON = 333  # a prompt holding this token id fails inside the forward pass
BASE = dict(served_name=MODEL, dtype="float32", kv_cache_dtype="int8", block_size=4, max_model_len=256)


class Faults:
    """Wraps the engine's runner: an optional delay per step, and a failure for POISON."""

    def __init__(self, engine) -> None:
        self.delay = 0.0
        real = engine.runner.execute

        def execute(batch, *args, **kw):
            if self.delay:
                time.sleep(self.delay)
            if any(POISON in item.seq.token_ids[: item.seq.num_prompt_tokens] for item in batch):
                raise RuntimeError("injected fault")
            return real(batch, *args, **kw)

        engine.runner.execute = execute


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(str(tiny_model_dir), kv_cache_num_blocks=400, max_request_body_mb=1, **BASE) as (
        url,
        engine,
    ):
        yield url, engine, Faults(engine)


def wait_idle(engine, timeout):
    deadline = time.monotonic() + timeout
    while engine.stats()["kv_blocks_used"] or engine.has_unfinished():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def stream(c, url, body):
    """(text, finish_reason, error event or None, saw [DONE]) of one streamed completion."""
    text, finish, error, done = "", None, None, False
    async with c.stream("POST", url + "/v1/completions", content=json.dumps(body), headers=JSON) as r:
        if r.status_code != 200:
            return None, r.status_code, json.loads(await r.aread()), False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for ch in event["choices"]:
                    text += ch["text"]
                    finish = ch["finish_reason"] or finish
    return text, finish, error, done


HEALTHY = [f"The {w} of the" for w in ("people", "Senate", "war", "House", "Union", "law", "tax", "army")]


def healthy_body(prompt):
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def test_poisoned_requests_leave_eight_healthy_streams_untouched(server):
    url, engine, _ = server

    async def alone():
        async with httpx.AsyncClient(timeout=60) as c:
            return [await stream(c, url, healthy_body(p)) for p in HEALTHY]

    undisturbed = asyncio.run(alone())
    poisons = [
        {"model": MODEL, "prompt": "The", "max_tokens": 8, "temperature": 1e-38, "stream": True},
        {"model": MODEL, "prompt": "The", "max_tokens": 8, "temperature": 1.0, "repetition_penalty": 1e-300},
        {"model": MODEL, "prompt": "The", "max_tokens": 8, "seed": 2**64, "stream": True},
        {"model": MODEL, "prompt": "The \ud800", "max_tokens": 8, "stream": True},
        {"model": MODEL, "prompt": [5, POISON, 6], "max_tokens": 8, "stream": True},
        {"model": MODEL, "prompt": [5, POISON, 6], "max_tokens": 8},
    ]

    async def together():
        async with httpx.AsyncClient(timeout=60) as c:
            healthy = [stream(c, url, healthy_body(p)) for p in HEALTHY]
            bad = [
                stream(c, url, b)
                if b.get("stream")
                else c.post(url + "/v1/completions", content=json.dumps(b), headers=JSON)
                for b in poisons
            ]
            return await asyncio.gather(*healthy, *bad)

    results = asyncio.run(together())
    assert results[: len(HEALTHY)] == undisturbed
    assert all(r[1] == "length" and r[3] for r in undisturbed)
    tiny_temp, big_penalty, big_seed, surrogate, failed_stream, failed_plain = results[len(HEALTHY) :]
    assert tiny_temp[1] == "length" and tiny_temp[3]  # clamped to greedy, served
    assert big_penalty.status_code == 200 and big_penalty.json()["choices"][0]["finish_reason"] == "length"
    assert big_seed[1] == 400 and "seed" in big_seed[2]["error"]["message"]
    assert surrogate[1] == 422 and "Unicode" in surrogate[2]["error"]["message"]
    text, finish, error, done = failed_stream
    assert error and "injected fault" in error["message"] and done
    assert failed_plain.status_code == 500 and "injected fault" in failed_plain.json()["error"]["message"]
    assert wait_idle(engine, 5)
    assert httpx.get(url + "/health").status_code == 200  # the engine thread lives on


def _give_up_after(url, headers, seconds):
    body = {"model": MODEL, "prompt": "The", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=seconds)
    return time.monotonic()


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_non_streaming_client_that_leaves_is_aborted_within_a_second(tiny_model_dir, api_key):
    with running_server(str(tiny_model_dir), api_key=api_key, kv_cache_num_blocks=200, **BASE) as (
        url,
        engine,
    ):
        faults = Faults(engine)
        faults.delay = 0.03  # 200 tokens would take 6 s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        before = engine.stats()["generation_tokens_total"]
        left = _give_up_after(url, headers, 0.6)
        assert wait_idle(engine, 1.0), engine.stats()
        assert time.monotonic() - left < 1.0
        assert engine.stats()["generation_tokens_total"] - before < 60


def _raw_request(port, headers: list[str], body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
    return s


def _status(sock) -> int:
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_oversized_body_gets_413_fast_while_health_answers(server):
    url, engine, _ = server
    port = int(url.rsplit(":", 1)[1])
    head = ["POST /v1/completions HTTP/1.1", "Host: x", "Content-Type: application/json"]
    t = time.perf_counter()
    s = _raw_request(port, [*head, f"Content-Length: {20 * 2**20}"], b'{"model": "tiny", "prompt": "')
    # Bounds of 1 s: a server that waited for the body (never sent) or read it on the event
    # loop would not answer before the client's 5 s timeouts; 0.1 s failed once at 0.107 on
    # a fresh clone on a loaded 2-core VM.
    assert _status(s) == 413 and time.perf_counter() - t < 1.0
    s.close()
    # No Content-Length: counted as it streams; /health answers while the upload trickles in.
    s = _raw_request(port, [*head, "Transfer-Encoding: chunked"])
    piece = b"x" * 65536
    for _ in range(4):
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        t = time.perf_counter()
        assert httpx.get(url + "/health").status_code == 200 and time.perf_counter() - t < 1.0
    for _ in range(16):
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            break
    assert _status(s) == 413
    s.close()
    r = httpx.post(url + "/v1/completions", content=b"x" * (2 * 2**20), headers=JSON)
    assert r.status_code == 413 and "max_request_body_mb" in r.json()["error"]["message"]
    assert engine.stats()["kv_blocks_used"] == 0


def test_huge_prompt_is_tokenized_off_the_event_loop(tiny_model_dir):
    with running_server(str(tiny_model_dir), kv_cache_num_blocks=200, **BASE) as (url, _):
        prompt = "The people of the United States are free. " * 70_000  # 3 MB, under the 4 MiB limit
        result = {}

        def post():
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            result["r"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        th = threading.Thread(target=post)
        th.start()
        worst = 0.0
        while th.is_alive():
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.02)
        th.join()
        assert result["r"].status_code == 400 and "max_model_len" in result["r"].json()["error"]["message"]
        # Tokenizing this prompt takes ~2.8 s; on the event loop /health would stall that long.
        # JSON parsing of the 3 MB body stays on the loop (0.1-0.26 s measured on a noisy
        # 2-core machine), so the bound leaves room for it.
        assert worst < 1.0, worst


def test_request_timeout_aborts_and_frees(tiny_model_dir):
    with running_server(str(tiny_model_dir), kv_cache_num_blocks=200, request_timeout=0.5, **BASE) as (
        url,
        engine,
    ):
        Faults(engine).delay = 0.03
        body = {"model": MODEL, "prompt": "The", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 504 and "request_timeout" in r.json()["error"]["message"]
        assert wait_idle(engine, 1.0)

        async def go():
            async with httpx.AsyncClient(timeout=10) as c:
                return await stream(c, url, {**body, "stream": True})

        text, finish, error, done = asyncio.run(go())
        assert error["type"] == "timeout_error" and done and finish is None
        assert wait_idle(engine, 1.0)
