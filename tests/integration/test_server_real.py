"""A real server on the default model: every KV dtype answers sensibly and reports itself."""

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serving import free_port, running_server

from ferrolm import KvCacheDtype

pytestmark = pytest.mark.integration
# The bare question sits on a near-tie between "The" and "L" even with the fp32 cache
# (0.08 nats), so quantization noise may legitimately flip it; this phrasing does not.
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_every_kv_dtype_serves_chat(default_model_path, dtype):
    with running_server(
        str(default_model_path),
        served_name="smollm2-135m",
        dtype="float32",
        kv_cache_dtype=dtype.value,
        kv_cache_memory_gb=0.1,  # int4pc (K and V) stages 57 MiB of blocks being filled
    ) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0
        )
        assert "Paris" in r.choices[0].message.content
        assert client.models.list().data[0].model_extra["kv_cache_dtype"] == dtype.value
        assert f'ferrolm_kv_cache_info{{kv_cache_dtype="{dtype.value}",model_name="smollm2-135m"}} 1.0' in (
            httpx.get(url + "/metrics").text
        )


def test_ferrolm_serve_command(default_model_path, tmp_path):
    """`ferrolm serve` as a user starts it: flags, env vars, the start-up line, a real client."""
    port = free_port()
    env = {**os.environ, "FERROLM_KV_CACHE_DTYPE": "fp8", "FERROLM_KV_CACHE_MEMORY_GB": "0.1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ferrolm.cli",
                "serve",
                "--model",
                str(default_model_path),
                "--port",
                str(port),
                "--served-model-name",
                "smol",
                "--api-key",
                "k",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content
        startup = log_path.read_text()
        assert "KV fp8 |" in startup and "11880 bytes/token" in startup and "cache holds" in startup
    finally:
        proc.terminate()
        proc.wait(timeout=30)
