"""The HTTP server's thread beside the engine's (fedprefix serve, the serving benchmark)."""

from __future__ import annotations

import threading
import time

from fedprefix.common.errors import FedPrefixError

from .engine import Engine


def start_http(engine: Engine, server) -> threading.Thread:
    """Run a uvicorn `server` on a thread of its own, beside the engine that the caller then
    run()s on its own thread (faster on CPUs: see Engine.run); the engine stops when the server
    ends. Returns once the server listens; FedPrefixError if it could not (a port in use)."""

    def serve() -> None:
        try:
            server.run()
        finally:
            engine.stop()

    thread = threading.Thread(target=serve, name="fedprefix-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            config = server.config
            raise FedPrefixError(f"could not listen on {config.host}:{config.port} (is the port in use?)")
        time.sleep(0.05)
    return thread
