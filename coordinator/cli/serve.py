"""`fedprefix serve`: the OpenAI-compatible server over the batching engine (its own deployable)."""

from __future__ import annotations

import signal

import typer
from fedprefix.common import base_model
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.precision import resolve_dtype

from .main import DTYPE_HELP, app, console, fail


@app.command()
def serve(
    base: str = typer.Option(base_model.DEFAULT_BASE, "--base", help="Base model: registry name, folder or hub id."),
    store: str = typer.Option(..., "--store", help="Encrypted prefix store folder (ciphertext only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    max_batch_size: int = typer.Option(64, "--max-batch-size", help="Rows per decode step."),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before answering 429."),
    max_wait: float = typer.Option(30.0, "--max-wait", help="Seconds a request may wait for a batch slot."),
    cache_mib: int = typer.Option(1024, "--prefix-cache-mib", help="Memory for decrypted prefixes (LRU)."),
    static: bool = typer.Option(False, "--static-batching", help="Static instead of continuous batching."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Serve many users' prefixes over one base: an OpenAI-compatible HTTP API.

    Example: fedprefix serve --base smollm2-135m-instruct --store store --port 8000
    then: curl localhost:8000/v1/completions -H "X-Prefix-Key: $KEY_B64" -H "Content-Type: application/json"
          -d '{"prompt": "Hello", "user": "alice", "max_tokens": 20}'
    """
    import uvicorn
    from fedprefix.common.store import PrefixStore
    from fedprefix.coordinator.serving import Engine
    from fedprefix.coordinator.serving.server import create_app, start_http

    try:
        loaded = base_model.load_base(base, dtype=resolve_dtype(dtype))
        prefix_store = PrefixStore(store)
    except FedPrefixError as exc:
        fail(exc)
    engine = Engine(
        loaded,
        store=prefix_store,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_wait_s=max_wait,
        continuous=not static,
        prefix_cache_bytes=cache_mib << 20,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(engine, base), host=host, port=port, log_level="warning"))
    try:  # the engine computes on this (main) thread, the HTTP server answers on another: see Engine.run
        http = start_http(engine, server)
    except FedPrefixError as exc:
        fail(exc)
    console.print(f"serving {base} ({loaded.dtype}) with prefixes from {store} on http://{host}:{port}/v1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the same way on Ctrl-C and SIGTERM
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
