"""AsyncEngine: the server's only view of the engine.

One background thread steps the LLMEngine; asyncio callers get streams. Prompts
are tokenized and validated on a small thread pool, off the event loop (a large
prompt or chat template must not stall /health or other streams), so a bad
request fails at once and touches nothing; then it is handed to the engine thread
through a command queue, which applies additions and aborts between steps. Each
request's outputs come back on its own asyncio.Queue. A request that fails inside
the engine comes back as a finished output with `error` set; an unexpected failure
of a whole step fails the requests in flight and the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.outputs import RequestOutput
from ferrolm.engine.sampling_params import SamplingParams

log = logging.getLogger("ferrolm.server")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_generated: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_token_timing=None) -> None:
        self.engine = engine
        self.on_token_timing = on_token_timing  # callback(kind, seconds), kind "ttft" or "tpot"
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ferrolm-engine", daemon=True)
        self.lock = threading.Lock()  # guards engine state read by stats()
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ferrolm-tokenize")

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # --- what the server may know of the engine ------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_cache_dtype(self) -> str:
        return self.engine.kv_spec.describe()

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """As vLLM: the rest of the context, within what the cache can hold."""
        room = self.engine.max_sequence_tokens - num_prompt_tokens
        return max(1, room)

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def text_of(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids)

    # --- called from the event loop -------------------------------------------------
    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text or ids), computed off the event loop."""
        return await self._off_loop(self.engine.encode_prompt, prompt)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the model's chat template, off the loop."""
        return await self._off_loop(self._chat_ids, messages)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.engine.tokenizer.apply_chat_template(messages)
        except ValueError:
            raise
        except Exception as e:  # the template rejected the conversation (jinja raise_exception ...)
            raise ValueError(f"the chat template rejected these messages: {e}") from e

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's one admission rule; raises ValueError for a request that can never run."""
        self.engine.check_request(len(prompt_ids), params)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that changed it; aborts if cancelled."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, object]:
        with self.lock:
            return self.engine.stats()

    # --- the engine thread --------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self.lock:
                    outputs = self.engine.step()
            except Exception as e:  # a bug must not leave clients waiting forever
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            now = time.perf_counter()
            for out in outputs:
                self._deliver(out, now)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    if rid not in self._streams:
                        continue  # the client went away before we started
                    try:
                        self.engine.add_request(rid, ids, params)
                    except ValueError as e:
                        self._push(rid, e)
                else:
                    self.engine.abort(cmd[1])

    def _deliver(self, out: RequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if self.on_token_timing is not None:
            if stream.first_token_at is None:
                stream.first_token_at = now
                self.on_token_timing("ttft", now - stream.arrival)
            elif stream.last_token_at is not None:
                self.on_token_timing("tpot", now - stream.last_token_at)
        stream.last_token_at = now
        self._push(out.request_id, out)

    def _push(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            for rid in list(self._streams):
                self.engine.abort(rid)
                self._push(rid, RuntimeError(f"engine error: {error}"))
