"""The OpenAI-compatible app: routes over the AsyncEngine facade, with the API-key
check and the body-size limit as plain ASGI middleware and OpenAI-style errors."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ferrolm.config import ServerConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.server.async_engine import AsyncEngine
from ferrolm.server.auth import ApiKeyAuth
from ferrolm.server.errors import install_error_handlers
from ferrolm.server.limits import BodySizeLimit
from ferrolm.server.metrics import ServerMetrics
from ferrolm.server.routes import make_router
from ferrolm.server.serving_chat import ChatServing
from ferrolm.server.serving_completions import CompletionServing


def create_app(
    engine: LLMEngine, config: ServerConfig | None = None, model_name: str | None = None
) -> FastAPI:
    """model_name: the id clients use; config.served_model_name wins, then this, then --model."""
    config = config or ServerConfig()
    name = config.served_model_name or model_name or engine.config.model.name
    aengine = AsyncEngine(engine)
    metrics = ServerMetrics(aengine.stats, name)
    aengine.on_token_timing = metrics.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        aengine.shutdown()

    docs = config.enable_docs
    app = FastAPI(
        title="ferrolm",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.engine = aengine
    install_error_handlers(app)
    completions = CompletionServing(aengine, config, name)
    chat = ChatServing(aengine, config, name)
    app.include_router(make_router(completions, chat, metrics))
    # Added last = outermost: the size check runs before anything reads the body.
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(BodySizeLimit, max_bytes=int(config.max_request_body_mb * 2**20))
    return app
