"""The HTTP routes: thin, each hands its body to a serving object."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ferrolm.server.errors import ApiError
from ferrolm.server.metrics import ServerMetrics
from ferrolm.server.protocol import ChatCompletionRequest, CompletionRequest
from ferrolm.server.serving_chat import ChatServing
from ferrolm.server.serving_completions import CompletionServing


def make_router(completions: CompletionServing, chat: ChatServing, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()
    engine, model_name = completions.engine, completions.model_name

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "ferrolm",
            "max_model_len": engine.max_model_len,
            "kv_cache_dtype": engine.kv_cache_dtype,
        }

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} does not exist", "not_found_error", "model")
        return model_card()

    @router.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(body, request)

    @router.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    return router
