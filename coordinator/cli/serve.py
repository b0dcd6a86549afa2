"""`fedprefix serve`: the OpenAI-compatible server over the batching engine (its own deployable)."""

from __future__ import annotations

import os
import signal
import sys
import time

import typer
from fedprefix.common.config import DEFAULT_BASE, DEVICE_HELP
from fedprefix.common.errors import FedPrefixError

from .main import (
    ALLOWED_HOST_HELP,
    CERT_HELP,
    DTYPE_HELP,
    KEY_HELP,
    app,
    console,
    dtype_option,
    fail,
    finite_option,
    http_exposure,
    non_empty_path,
    require_free_port,
    warn,
)


def _device(value: str) -> str:
    """--device's check: a bad value is a usage error (exit 2, naming --help), before anything loads."""
    from fedprefix.common.precision import resolve_device  # torch: imported by the command that needs it only

    try:
        resolve_device(value)
    except FedPrefixError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _non_blank_name(value: str | None) -> str | None:
    if value is not None and not value.strip():  # would silently fall back to --base
        raise typer.BadParameter("an empty name; leave the option out to serve under --base")
    return value


@app.command()
def serve(
    base: str = typer.Option(DEFAULT_BASE, "--base", help="Base model: registry name, folder or hub id."),
    store: str = typer.Option(
        ..., "--store", help="Encrypted prefix store folder (ciphertext only).", callback=non_empty_path
    ),
    served_model_name: str = typer.Option(
        None,
        "--served-model-name",
        help="The model name clients send and /v1/models lists (default: --base).",
        callback=_non_blank_name,
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help=ALLOWED_HOST_HELP),
    ssl_certfile: str = typer.Option(None, "--ssl-certfile", help=CERT_HELP, callback=non_empty_path),
    ssl_keyfile: str = typer.Option(None, "--ssl-keyfile", help=KEY_HELP, callback=non_empty_path),
    max_batch_size: int = typer.Option(64, "--max-batch-size", min=1, max=4096, help="Rows per decode step."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests (all users) before answering 429."),
    max_queue_per_user: int = typer.Option(
        64,
        "--max-queue-per-user",
        min=1,
        help="Waiting requests of one user (anonymous: one user) before answering 429.",
    ),
    max_wait: float = typer.Option(
        30.0, "--max-wait", min=0.001, help="Seconds a request may wait for a batch slot.", callback=finite_option
    ),
    cache_mib: int = typer.Option(1024, "--prefix-cache-mib", min=1, help="Memory for decrypted prefixes (LRU)."),
    prompt_cache_mib: int = typer.Option(
        256,
        "--prompt-cache-mib",
        min=0,
        help="Memory for users' prompt KV, reused by their next requests (LRU; 0: off).",
    ),
    max_prefill_tokens: int = typer.Option(
        2048, "--max-prefill-tokens", min=1, help="Prompt tokens computed per step beside decoding (chunked prefill)."
    ),
    kv_cache_mib: int = typer.Option(
        None,
        "--kv-cache-mib",
        min=1,
        help="Memory for the running batch's KV cache; requests wait for room, or are refused if one "
        "alone does not fit (default: a fifth of the memory free at start, less the caches).",
    ),
    static: bool = typer.Option(False, "--static-batching", help="Static instead of continuous batching."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP, callback=dtype_option),
    device: str = typer.Option("auto", "--device", help=f"Where the base runs: {DEVICE_HELP}.", callback=_device),
    eager: bool = typer.Option(False, "--no-cuda-graphs", help="On a GPU, run every decode step eagerly."),
    max_prompts: int = typer.Option(16, "--max-prompts", min=1, help="Prompts in one completions request (else 400)."),
    max_stops: int = typer.Option(8, "--max-stops", min=0, help="Stop strings in one request (else 400)."),
    max_stop_chars: int = typer.Option(64, "--max-stop-chars", min=1, help="Characters of one stop string (else 400)."),
    max_messages: int = typer.Option(256, "--max-messages", min=1, help="Turns in one chat request (else 400)."),
    max_body_kib: int = typer.Option(1024, "--max-body-kib", min=1, help="Request body size in KiB (else 413)."),
    max_unlocks: int = typer.Option(
        4,
        "--max-unlocks",
        min=1,
        help="Passphrase unlocks (scrypt, 128 MiB each) running at once; more wait, then 429.",
    ),
    max_wrong_keys: int = typer.Option(
        5, "--max-wrong-keys", min=1, help="Wrong keys in a row for one user before its unlocks get 429 with backoff."
    ),
    wrong_key_backoff: float = typer.Option(
        1.0,
        "--wrong-key-backoff",
        min=0,
        help="Seconds of the first backoff; doubles per further wrong key (max 300).",
        callback=finite_option,
    ),
    replicas: int = typer.Option(
        1, "--replicas", min=1, help="Engine replicas behind Ray Serve, each user routed to one (1: a single process)."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Deploy the replicas onto this Ray cluster (e.g. ray://head:10001 or auto)."
    ),
    replica_cpus: float = typer.Option(
        None,
        "--replica-cpus",
        min=0.001,
        max=4096,
        help="Ray CPUs per replica (default: this machine's cores / replicas).",
        callback=finite_option,
    ),
    max_users_per_replica: int = typer.Option(
        1024, "--max-users-per-replica", min=1, help="Users one replica holds for routing (Ray Serve multiplexing LRU)."
    ),
) -> None:
    """Serve many users' prefixes over one base: an OpenAI-compatible HTTP API.

    Example: fedprefix serve --base smollm2-135m-instruct --store store --port 8000
    then: curl localhost:8000/v1/completions -H "X-Prefix-Key: $KEY_B64" -H "Content-Type: application/json"
          -d '{"prompt": "Hello", "user": "alice", "max_tokens": 20}'
    (KEY_B64=$(base64 < alice.key | tr -d '\\n')); a passphrase with non-ASCII characters goes as:
    -H "X-Prefix-Key: b64:$(printf %s "$PASS" | base64 | tr -d '\\n')".
    """
    from fedprefix.common.resources import no_core_dumps
    from fedprefix.common.store import existing_store_folder

    no_core_dumps()  # here and in the replicas Ray starts here (a cluster's workers are the cluster's)
    if ray_address is None:  # on a Ray cluster the path is the workers' to check
        try:
            existing_store_folder(store)
        except FedPrefixError as exc:
            fail(exc)
    hosts = http_exposure(host, port if ray_address is None else None, allowed_host, ssl_certfile, ssl_keyfile)
    if replicas > 1 or ray_address is not None:
        if device not in ("auto", "cpu"):  # replicas reserve Ray CPUs; GPU replicas are not built
            fail(FedPrefixError(f"--device {device}: replicas (--replicas, --ray-address) run on CPUs only"))
        return _serve_replicas(locals())
    from fedprefix.common import base_model
    from fedprefix.common.http_guards import uvicorn_server
    from fedprefix.common.precision import resolve_device, resolve_dtype
    from fedprefix.common.store import PrefixStore
    from fedprefix.coordinator.serving import Engine
    from fedprefix.coordinator.serving.http_thread import start_http
    from fedprefix.coordinator.serving.limits import ServingLimits
    from fedprefix.coordinator.serving.server import create_app
    from fedprefix.coordinator.serving.unlock import UnlockGuard
    from pydantic import ValidationError

    try:  # every setting checked before the base loads
        limits = ServingLimits(
            max_body_bytes=max_body_kib << 10,
            max_prompts=max_prompts,
            max_stops=max_stops,
            max_stop_chars=max_stop_chars,
            max_messages=max_messages,
        )
        guard = UnlockGuard(max_concurrent=max_unlocks, max_failures=max_wrong_keys, backoff_s=wrong_key_backoff)
        if max_prefill_tokens < 1 or prompt_cache_mib < 0:
            raise ValueError("--max-prefill-tokens must be at least 1 and --prompt-cache-mib at least 0")
        where = resolve_device(device)
    except (ValidationError, ValueError) as exc:
        fail(FedPrefixError(f"invalid serving setting: {exc}"))
    try:
        loaded = base_model.load_base(base, dtype=resolve_dtype(dtype, where), device=where)
        prefix_store = PrefixStore(store)
    except FedPrefixError as exc:
        fail(exc)
    try:  # a --kv-cache-mib that holds no request is refused here, before anything listens
        engine = Engine(
            loaded,
            store=prefix_store,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_wait_s=max_wait,
            continuous=not static,
            prefix_cache_bytes=cache_mib << 20,
            max_queue_per_user=max_queue_per_user,
            unlock_guard=guard,
            max_prefill_tokens=max_prefill_tokens,
            prompt_cache_bytes=prompt_cache_mib << 20,
            cuda_graphs=not eager,
            kv_cache_bytes=None if kv_cache_mib is None else kv_cache_mib << 20,
        )
    except ValueError as exc:
        fail(FedPrefixError(f"invalid serving setting: {exc}"))
    served = create_app(engine, served_model_name or base, limits, allowed_hosts=hosts)
    expired = served.state.metrics.requests.labels("other", "408").inc  # a request's headers never came whole
    server = uvicorn_server(served, host, port, ssl_certfile, ssl_keyfile, expired)
    try:  # the engine computes on this (main) thread, the HTTP server answers on another: see Engine.run
        http = start_http(engine, server)
    except FedPrefixError as exc:
        fail(exc)
    console.print(
        f"serving {base} ({loaded.dtype} on {where}, KV cache up to {engine.kv_budget.describe()}) "
        f"with prefixes from {store} on {'https' if ssl_certfile else 'http'}://{host}:{port}/v1",
        markup=False,
    )
    # stop the same way on Ctrl-C and SIGTERM; SIGINT too where a shell started us with it ignored
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    # Engine and HTTP have stopped, every reply is out: leave without the interpreter's teardown,
    # whose garbage collection of torch's and transformers' objects took 7-12 s (past many a
    # container's stop grace period) for nothing left to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_replicas(options: dict) -> None:
    """`fedprefix serve --replicas N`: N engine replicas behind Ray Serve, until Ctrl-C or SIGTERM."""
    import contextlib

    from fedprefix.common.resources import usable_cores

    cores, count, local = usable_cores(), options["replicas"], options["ray_address"] is None
    if local:  # read when ray is imported: before the import below
        from fedprefix.coordinator.processes import ray_token_env
        from fedprefix.coordinator.superlink import check_python_path

        try:  # else the Router's worker never starts, and nothing says why
            check_python_path(sys.executable)
        except FedPrefixError as exc:
            fail(exc)
        os.environ.update(ray_token_env(os.environ))
    from fedprefix.common.precision import resolve_dtype
    from fedprefix.coordinator.serving import replicas
    from pydantic import ValidationError

    fields = {k: v for k, v in options.items() if k in replicas.ReplicaSettings.model_fields}
    try:
        settings = replicas.ReplicaSettings(
            **fields
            | {
                "static_batching": options["static"],
                "prefix_cache_mib": options["cache_mib"],
                "replica_cpus": options["replica_cpus"] or (cores / count if local else 1.0),
                "torch_threads": max(1, cores // count) if local else 1,
                "replicas_per_machine": count if local else 1,
                "allowed_hosts": None if options["hosts"] is None else sorted(options["hosts"]),
            }
        )
        resolve_dtype(settings.dtype)
    except (ValidationError, ValueError) as exc:
        fail(FedPrefixError(f"invalid serving setting: {exc}"))
    except FedPrefixError as exc:
        fail(exc)
    if local:  # a cluster's nodes are its owner's to size
        _check_replicas_fit(settings, count)
    host, port = options["host"], options["port"]
    if not local:  # serve() checked a local one: Serve's proxy would only log a taken port, and never answer
        require_free_port(host, port)

    def stop_on_sigterm() -> None:  # as on Ctrl-C; installed once ray.init (which sets its own) is done
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    try:
        tls = {"ssl_certfile": options["ssl_certfile"], "ssl_keyfile": options["ssl_keyfile"]}
        replicas.start(settings, host, port, options["ray_address"], after_init=stop_on_sigterm, tls=tls)
        where = "a local Ray" if local else f"the Ray cluster at {options['ray_address']}"
        scheme = "https" if options["ssl_certfile"] else "http"
        console.print(
            f"serving {settings.base} with prefixes from {settings.store} on {scheme}://{host}:{port}/v1 "
            f"({count} replicas on {where})"
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except BaseException:
        with contextlib.suppress(Exception):  # the start's error is the one to report, not the shutdown's after it
            replicas.shutdown(local=local)
        raise
    replicas.shutdown(local=local)


def _check_replicas_fit(settings, count: int) -> None:
    """One line, before Ray starts, where `count` replicas of the base would not fit in the memory
    free (a warning where only their full caches would not)."""
    from fedprefix.common.base_checks import parameter_count
    from fedprefix.common.resources import available_memory
    from fedprefix.coordinator.serving.replica_sizing import check_replicas_fit

    try:
        caches = settings.prefix_cache_mib + settings.prompt_cache_mib
        warning = check_replicas_fit(count, parameter_count(settings.base), caches, available_memory())
    except FedPrefixError as exc:  # the base not fetched, say, or too many replicas
        fail(exc)
    if warning:
        warn(warning)
