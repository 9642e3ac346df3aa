"""OpenAI-compatible HTTP API over one AsyncEngine."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.outputs import RequestOutput
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.server.async_engine import AsyncEngine
from ferrolm.server.metrics import ServerMetrics
from ferrolm.server.protocol import ChatCompletionRequest, CompletionRequest


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def top_entries(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely (token, logprob) pairs of one position."""
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def create_app(engine: LLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    metrics = ServerMetrics(lambda: aengine.stats(), model_name)
    aengine = AsyncEngine(engine, on_token_timing=metrics.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        aengine.shutdown()

    app = FastAPI(title="ferrolm", lifespan=lifespan)
    app.state.engine = aengine

    # --- errors and auth ------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "malformed JSON in the request body")
        parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}" for err in errors]
        return error_response(422, "; ".join(parts), param=".".join(str(x) for x in errors[0]["loc"][1:]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    # --- plain endpoints ------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "ferrolm",
            "max_model_len": engine.max_model_len,
            "kv_cache_dtype": engine.kv_format.dtype.value,
        }

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {model_name!r}",
                "not_found_error",
                "model",
            )

    def params_or_400(make) -> SamplingParams:
        try:
            return make()
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def prepare(prompt, params: SamplingParams) -> list[int]:
        try:
            ids = aengine.prepare(prompt, params)
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from e
        if len(ids) + params.max_tokens > engine.max_model_len:  # as OpenAI and vLLM answer
            raise ApiError(
                400,
                f"this model's maximum context length (max_model_len) is {engine.max_model_len} tokens, but "
                f"{len(ids)} prompt tokens + {params.max_tokens} max_tokens were requested",
                param="max_tokens",
            )
        return ids

    # --- completions --------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = params_or_400(lambda: body.sampling_params(body.max_tokens, body.logprobs))
        prompts = body.prompts()
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        ids = [prepare(p, params) for p in prompts]  # all validated before any starts
        rid = f"cmpl-{uuid.uuid4().hex}"
        make = functools.partial(completion_choice, top_n=body.logprobs or 0)
        return await respond(request, body, rid, "text_completion", ids, params, make)

    def completion_choice(index: int, out, new_from: int, delta: str, finish, top_n: int = 0) -> dict:
        logprobs = completion_logprobs(out, new_from, top_n)
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}

    def completion_logprobs(out, new_from: int, top_n: int):
        if out.logprobs is None:
            return None
        tok = engine.tokenizer
        ids, lps = out.token_ids[new_from:], out.logprobs[new_from:]
        return {
            "tokens": [tok.decode([t], skip_special_tokens=False) for t in ids],
            "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
            "top_logprobs": [
                {tok.decode([k], skip_special_tokens=False): v for k, v in top_entries(lp, top_n)}
                for lp in lps
            ],
            "text_offset": [],
        }

    # --- chat -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            prompt_ids = engine.tokenizer.apply_chat_template(body.conversation())
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as vLLM: the rest of the context, within what the cache can hold
            room = min(engine.max_model_len, engine.pool.capacity_tokens) - len(prompt_ids)
            max_tokens = max(1, room)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = params_or_400(lambda: body.sampling_params(max_tokens, top))
        ids = prepare(prompt_ids, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        make = functools.partial(chat_choice, top_n=top or 0)
        return await respond(request, body, rid, "chat.completion", [ids], params, make)

    def chat_choice(
        index, out, new_from: int, delta: str, finish, stream: bool = False, top_n: int = 0
    ) -> dict:
        logprobs = None
        if out.logprobs is not None:
            tok = engine.tokenizer

            def entry(t: int, lp: float) -> dict:
                s = tok.decode([t], skip_special_tokens=False)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            logprobs = {
                "content": [
                    {**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in top_entries(lp, top_n)]}
                    for t, lp in zip(out.token_ids[new_from:], out.logprobs[new_from:])
                ]
            }
        if stream:
            delta_msg = {"role": "assistant", "content": delta} if new_from == 0 else {"content": delta}
            return {"index": index, "delta": delta_msg, "logprobs": logprobs, "finish_reason": finish}
        message = {"role": "assistant", "content": delta}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    # --- shared response machinery ------------------------------------------------------------
    async def respond(request, body, rid, kind, prompt_ids, params, make_choice):
        n = params.n
        created = int(time.time())
        sub_ids = [f"{rid}-{i}" for i in range(len(prompt_ids))]
        gens = [aengine.generate(sid, ids, params) for sid, ids in zip(sub_ids, prompt_ids)]
        usage_prompt = sum(len(ids) for ids in prompt_ids)
        chunk_kind = kind + ".chunk" if kind == "chat.completion" else kind

        def usage(outs: list[RequestOutput | None]) -> dict:
            gen = sum(len(c.token_ids) for o in outs if o for c in o.outputs)
            return {
                "prompt_tokens": usage_prompt,
                "completion_tokens": gen,
                "total_tokens": usage_prompt + gen,
            }

        if body.stream:
            return StreamingResponse(
                stream_events(request, rid, created, chunk_kind, gens, sub_ids, n, make_choice, body, usage),
                media_type="text/event-stream",
            )
        finals = await collect(request, gens, sub_ids)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for p, out in enumerate(finals):
            for c in out.outputs:
                choice = make_choice(p * n + c.index, c, 0, c.text, c.finish_reason)
                choices.append(choice)
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage(finals),
        }

    async def merged(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests, interleaved as they come."""
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
                i, item = await q.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    remaining -= 1
                    continue
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(request, gens, sub_ids) -> list[RequestOutput] | None:
        finals: list[RequestOutput | None] = [None] * len(gens)

        async def consume():
            async for i, out in merged(gens):
                finals[i] = out

        task = asyncio.create_task(consume())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                for sid in sub_ids:
                    aengine.abort(sid)
                return None
        task.result()
        return finals

    async def stream_events(request, rid, created, kind, gens, sub_ids, n, make_choice, body, usage):
        sent = {}  # choice index -> tokens already streamed
        last: list[RequestOutput | None] = [None] * len(gens)
        is_chat = kind == "chat.completion.chunk"
        try:
            async for p, out in merged(gens):
                last[p] = out
                choices = []
                for c in out.outputs:
                    index = p * n + c.index
                    new_from = sent.get(index, 0)
                    if c.finish_reason is None and not c.delta_text and (not is_chat or index in sent):
                        continue
                    if index in sent and sent[index] < 0:
                        continue  # finished earlier
                    args = (index, c, new_from, c.delta_text, c.finish_reason)
                    choices.append(make_choice(*args, stream=True) if is_chat else make_choice(*args))
                    sent[index] = -1 if c.finish_reason else len(c.token_ids)
                if choices:
                    chunk = {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": model_name,
                        "choices": choices,
                    }
                    if body.include_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
            if body.include_usage:
                chunk = {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": usage(last),
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for sid in sub_ids:
                aengine.abort(sid)  # no-op for finished requests

    return app
