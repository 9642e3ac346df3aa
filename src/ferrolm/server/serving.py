"""What chat and completions share: running a request's prompts on the AsyncEngine,
and answering as one JSON body or as a server-sent event stream.

A request ends in one of these ways, for streaming and non-streaming alike:
finished (the answer); the client went away (its sub-requests are aborted and
their blocks freed within a second); past request_timeout (aborted; 504, or an
error event); failed inside the engine (500, or an error event; the other
requests in flight are not touched). A stream always ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ferrolm.config import ServerConfig
from ferrolm.engine.outputs import CompletionOutput, RequestOutput
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.server.async_engine import AsyncEngine
from ferrolm.server.errors import ApiError, error_body

log = logging.getLogger("ferrolm.server")

DISCONNECT_POLL_S = 0.25

# make_choice(index, completion, tokens already sent, text delta, finish_reason, stream) -> dict
ChoiceMaker = Callable[[int, CompletionOutput, int, str, str | None, bool], dict]


class RequestFailed(Exception):
    """The engine finished a request with an error."""


@dataclass
class Job:
    """One API request: its prompts (each run as a sub-request with n completions)."""

    kind: str  # "text_completion" or "chat.completion"
    prompt_ids: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    make_choice: ChoiceMaker
    id_prefix: str

    def __post_init__(self) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sub_ids = [f"{self.id}-{i}" for i in range(len(self.prompt_ids))]

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat.completion" else self.kind

    def usage(self, outs: list[RequestOutput | None]) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        gen = sum(len(c.token_ids) for o in outs if o for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}


class Serving:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_name: str) -> None:
        self.engine = engine
        self.config = config
        self.model_name = model_name

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
            )

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.check(prompt_ids, params)
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from e

    @property
    def deadline_s(self) -> float | None:
        return self.config.request_timeout or None

    async def respond(self, request: Request, job: Job):
        gens = [self.engine.generate(sid, ids, job.params) for sid, ids in zip(job.sub_ids, job.prompt_ids)]
        deadline = time.monotonic() + self.deadline_s if self.deadline_s else None
        if job.stream:
            return StreamingResponse(self._events(job, gens, deadline), media_type="text/event-stream")
        try:
            finals = await self._collect(request, job, gens, deadline)
        except TimeoutError as e:
            raise ApiError(504, str(e), "timeout_error") from e
        except RequestFailed as e:
            raise ApiError(500, str(e), "server_error") from e
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        n = job.params.n
        choices = [
            job.make_choice(p * n + c.index, c, 0, c.text, c.finish_reason, False)
            for p, out in enumerate(finals)
            for c in out.outputs
        ]
        return {
            "id": job.id,
            "object": job.kind,
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
            "usage": job.usage(finals),
        }

    def _abort(self, job: Job) -> None:
        for sid in job.sub_ids:
            self.engine.abort(sid)  # a no-op for finished ones

    async def _merged(self, gens, deadline: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several sub-requests, interleaved as they come. Raises TimeoutError
        past the deadline and RequestFailed for an output that carries an error."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for out in gen:
                    await q.put((i, out))
                await q.put((i, None))
            except Exception as e:
                await q.put((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(gens)
            while remaining:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    i, item = await asyncio.wait_for(q.get(), wait)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"the request ran longer than request_timeout ({self.deadline_s:g} s) and was aborted"
                    ) from None
                if isinstance(item, Exception):
                    raise RequestFailed(f"engine error: {item}")
                if item is None:
                    remaining -= 1
                    continue
                if item.error:
                    raise RequestFailed(f"generation failed: {item.error}")
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: Request, job: Job, gens, deadline) -> list[RequestOutput] | None:
        """Final outputs, or None when the client disconnected (then all is aborted)."""
        finals: list[RequestOutput | None] = [None] * len(gens)

        async def consume():
            async for i, out in self._merged(gens, deadline):
                finals[i] = out

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not done and await request.is_disconnected():
                    task.cancel()
                    return None
            task.result()
            return finals
        finally:
            if not task.done():
                task.cancel()
            self._abort(job)

    def _chunk(self, job: Job, choices: list[dict], usage: dict | None = None, last: bool = False) -> str:
        chunk = {
            "id": job.id,
            "object": job.chunk_kind,
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
        }
        if job.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def _events(self, job: Job, gens, deadline) -> AsyncIterator[str]:
        sent: dict[int, int] = {}  # choice index -> tokens already streamed (-1: finished)
        last: list[RequestOutput | None] = [None] * len(gens)
        is_chat = job.kind == "chat.completion"
        n = job.params.n
        try:
            async for p, out in self._merged(gens, deadline):
                last[p] = out
                choices = []
                for c in out.outputs:
                    index = p * n + c.index
                    if sent.get(index, 0) < 0:
                        continue  # finished earlier
                    if c.finish_reason is None and not c.delta_text and (not is_chat or index in sent):
                        continue
                    new_from = sent.get(index, 0)
                    choices.append(job.make_choice(index, c, new_from, c.delta_text, c.finish_reason, True))
                    sent[index] = -1 if c.finish_reason else len(c.token_ids)
                if choices:
                    yield self._chunk(job, choices)
            if job.include_usage:
                yield self._chunk(job, [], job.usage(last))
        except TimeoutError as e:
            yield f"data: {json.dumps(error_body(504, str(e), 'timeout_error'))}\n\n"
        except RequestFailed as e:
            yield f"data: {json.dumps(error_body(500, str(e), 'server_error'))}\n\n"
        except Exception as e:  # a bug while answering: say so, and still end the stream
            log.exception("error while streaming %s", job.id)
            yield f"data: {json.dumps(error_body(500, f'internal error: {type(e).__name__}: {e}'))}\n\n"
        finally:
            self._abort(job)
        yield "data: [DONE]\n\n"
