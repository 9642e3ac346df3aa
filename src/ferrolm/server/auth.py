"""API-key check as plain ASGI middleware.

Not @app.middleware("http"): Starlette's BaseHTTPMiddleware wraps the request body
stream, and behind it `request.is_disconnected()` never turns true, so abandoned
non-streaming requests ran to the end. A plain ASGI wrapper passes `receive` through.
"""

from __future__ import annotations

import secrets

from ferrolm.server.errors import error_response

PROTECTED = ("/v1", "/docs", "/redoc", "/openapi.json")  # /health and /metrics stay open


class ApiKeyAuth:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key", "authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
