"""Limits on one request: body size (plain ASGI, answered before the body is read)
and the sizes of a request's lists (n, prompts, stop strings)."""

from __future__ import annotations

from starlette.exceptions import HTTPException

from ferrolm.config import ServerConfig
from ferrolm.server.errors import ApiError, error_response


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so that FastAPI's body parsing re-raises it
    as it is (anything else it turns into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes (max_request_body_mb)")


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else while it streams."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            if too_big:
                error = BodyTooLarge(self.max_bytes)
                return await error_response(413, error.detail)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def check_request_limits(cfg: ServerConfig, n: int, num_prompts: int, stop: list[str]) -> None:
    """400 for a request whose lists exceed the server's limits (before any work)."""
    if n > cfg.max_n:
        raise ApiError(400, f"n must be at most {cfg.max_n} (max_n), got {n}", param="n")
    if num_prompts > cfg.max_prompts:
        raise ApiError(
            400,
            f"at most {cfg.max_prompts} prompts per request (max_prompts), got {num_prompts}",
            param="prompt",
        )
    if len(stop) > cfg.max_stop:
        raise ApiError(400, f"at most {cfg.max_stop} stop strings (max_stop), got {len(stop)}", param="stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > cfg.max_stop_len:
        raise ApiError(
            400, f"stop strings must be at most {cfg.max_stop_len} characters (max_stop_len)", param="stop"
        )
