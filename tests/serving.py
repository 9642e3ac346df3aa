"""Start a real ferrolm server on a free loopback port, in this process (test helper)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from ferrolm import LLMEngine
from ferrolm.config import EngineConfig
from ferrolm.server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, served_name: str | None = None, api_key: str | None = None, **flags):
    """flags: engine and server settings (FLAGS names)."""
    cfg = EngineConfig().with_flags({"model": model, "api_key": api_key, **flags})
    engine = LLMEngine(cfg)
    app = create_app(engine, cfg.server, served_name or model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
