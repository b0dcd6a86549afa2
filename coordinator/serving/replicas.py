"""Serving beyond one process: N engine replicas behind Ray Serve, each user routed to one of them.

    client ──HTTP──► Ray Serve proxy ──► Router (reads `user` from the body)
                                           │ handle.options(multiplexed_model_id=user)
                                           ▼
                     EngineReplica × N: the single server's app (server.py) over its own Engine
                                           │ every 0.5 s: metrics + health
                                           ▼
                     ReplicaBoard: the last report of each live replica (/metrics, /health)

Ray Serve's proxy routes by headers only, and the user is named in the JSON body, so a thin
Router reads the body (bounded like the single server's), and calls the engine deployment
with the user id as Ray Serve's multiplexed model id: the request goes to the replica that
already holds that user (its decrypted prefix and prompt cache), or, for a new user, to the
replica holding the fewest users. Anonymous requests go to any replica. A client may not
pick the replica: the body's `user` is the only routing key (a `serve_multiplexed_model_id`
header is dropped), so a request always lands where its own prefix is used.

Each replica runs the single-process server's FastAPI app (create_app) in-process over its
own continuous-batching Engine: every check, error shape, stream and metric is that
server's by construction. The router forwards the raw request (the `X-Prefix-Key` header
included: keys travel only with requests; nothing decrypted leaves a replica) and relays
the response. @serve.batch is not used: it would split batches by user.

A replica that dies: its users' next requests go to another replica, which unlocks their
prefixes again from the store (a path every replica reads: on a cluster, a shared
filesystem). A request that was running there is sent again once, unless part of a
stream had already reached the client.

    fedprefix serve --store store --replicas 2                   # a local Ray, two replicas
    serve run fedprefix.coordinator.serving.replicas:build_app store=store replicas=2
"""

# No `from __future__ import annotations`: Ray Serve rebuilds the router's FastAPI routes from
# their signatures, and cannot resolve string annotations there (a `request: Request` became a query field).
import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fedprefix.common import base_model
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.resources import usable_cores
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from .limits import ServingLimits
from .metrics import families_of
from .replica_routing import UserAffinityRouter

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5  # how often a replica reports its metrics and health to the board
STALE_AFTER_S = 5.0  # a replica silent this long is gone (killed, or its node lost)
ATTEMPTS = 3  # a request whose replica died before answering is sent again, at most this often
DROPPED_HEADERS = {b"serve_multiplexed_model_id"}  # the client's Host stays: the app's redirects name it


class ReplicaSettings(BaseModel):
    """Everything a replica needs: the base, the store, the engine's and the HTTP limits, Ray's resources.

    Field names match `fedprefix serve`'s options; `serve run ... key=value` passes strings,
    which are converted here."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    base: str = base_model.DEFAULT_BASE
    served_model_name: str | None = None  # what clients send as `model` (None: base)
    store: str  # a folder every replica can read: on a cluster, a shared filesystem
    dtype: str = "auto"
    replicas: int = Field(2, ge=1)
    replica_cpus: float = Field(1.0, gt=0)  # Ray CPUs reserved per replica (fractional is fine)
    torch_threads: int = Field(1, ge=1)  # torch threads per replica: cores // replicas on one machine
    max_users_per_replica: int = Field(1024, ge=1)  # Ray's multiplexing LRU (its default, 3, is far too small)
    max_batch_size: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0)
    max_queue_per_user: int = Field(64, ge=0)
    max_wait: float = Field(30.0, gt=0)
    prefix_cache_mib: int = Field(1024, ge=0)
    prompt_cache_mib: int = Field(256, ge=0)  # users' prompt KV (0: off)
    kv_cache_mib: int | None = Field(None, ge=1)  # the running batch's KV (None: from the memory free at start)
    replicas_per_machine: int = Field(1, ge=1)  # replicas splitting one machine's free memory for that KV
    max_prefill_tokens: int = Field(2048, ge=1)  # chunked prefill: prompt tokens per step
    static_batching: bool = False
    max_prompts: int = Field(16, ge=1)
    max_stops: int = Field(8, ge=0)
    max_stop_chars: int = Field(64, ge=1)
    max_messages: int = Field(256, ge=1)
    max_body_kib: int = Field(1024, ge=1)
    max_unlocks: int = Field(4, ge=1)
    max_wrong_keys: int = Field(5, ge=1)
    wrong_key_backoff: float = Field(1.0, gt=0)
    # the Host names requests may give (common.http_guards.allowed_hosts; None: any): `fedprefix
    # serve` sets the loopback names where the proxy listens on loopback (DNS rebinding)
    allowed_hosts: list[str] | None = None

    @property
    def model_name(self) -> str:
        """The `model` clients send (and /v1/models lists)."""
        return self.served_model_name or self.base

    @property
    def limits(self) -> ServingLimits:
        return ServingLimits(
            max_body_bytes=self.max_body_kib << 10,
            max_prompts=self.max_prompts,
            max_stops=self.max_stops,
            max_stop_chars=self.max_stop_chars,
            max_messages=self.max_messages,
        )


# ------------------------------------------------------------------ one user's slot on a replica


class _UserSlot:
    """What Ray Serve's multiplexing holds per user on a replica: a name, no secret.

    The key arrives only with each request, so the engine's PrefixCache does the unlocking;
    when Ray evicts the user from this replica (its LRU), the user's decrypted entries here
    are dropped too, where the engine's cache can forget one user."""

    def __init__(self, engine, user: str) -> None:
        self.engine, self.user, self._dropped = engine, user, False

    def __del__(self) -> None:  # Ray Serve calls it on eviction; the collector may call it again
        if self._dropped:
            return
        self._dropped = True
        forget = getattr(self.engine.prefixes, "forget", None)  # PrefixCache.forget(user), where it exists
        if forget is not None:
            forget(self.user)


# ------------------------------------------------------------------ the replicas' board


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class ReplicaBoard:
    """The last report of every live replica: how the router reaches all of them.

    A DeploymentHandle reaches one replica, chosen by Ray; replicas pushing their state here
    (metrics are cumulative, so a lost report loses nothing) lets the router answer /metrics
    and /health from one call, and is deleted with the application like any deployment."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict]] = {}

    def report(self, snapshot: dict) -> None:
        self._reports[snapshot["replica"]] = (time.monotonic(), snapshot)

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def live(self) -> list[dict]:
        """Reports of replicas heard from within STALE_AFTER_S, oldest replica first."""
        now = time.monotonic()
        for replica in [r for r, (at, _) in self._reports.items() if now - at > STALE_AFTER_S]:
            del self._reports[replica]
        return sorted((s for _, s in self._reports.values()), key=lambda s: s["started"])


# ------------------------------------------------------------------ an engine replica


class EngineReplica:
    """One replica: its own base, Engine (started on a background thread) and the single server's app."""

    def __init__(self, settings: dict, board) -> None:
        import torch
        from fedprefix.common.precision import dtype_name, resolve_dtype
        from fedprefix.common.store import PrefixStore

        from .engine import Engine
        from .server import create_app
        from .unlock import UnlockGuard

        s = ReplicaSettings.model_validate(settings)
        torch.set_num_threads(s.torch_threads)  # the engine keeps the creating thread's setting
        loaded = base_model.load_base(s.base, dtype=resolve_dtype(s.dtype))
        guard = UnlockGuard(max_concurrent=s.max_unlocks, max_failures=s.max_wrong_keys, backoff_s=s.wrong_key_backoff)
        self.engine = Engine(
            loaded,
            store=PrefixStore(s.store),
            max_batch_size=s.max_batch_size,
            max_queue=s.max_queue,
            max_wait_s=s.max_wait,
            continuous=not s.static_batching,
            prefix_cache_bytes=s.prefix_cache_mib << 20,
            max_queue_per_user=s.max_queue_per_user,
            unlock_guard=guard,
            max_prefill_tokens=s.max_prefill_tokens,
            prompt_cache_bytes=s.prompt_cache_mib << 20,
            kv_cache_bytes=None if s.kv_cache_mib is None else s.kv_cache_mib << 20,
            kv_cache_sharers=s.replicas_per_machine,
        ).start()
        self.app = create_app(self.engine, s.model_name, s.limits, s.allowed_hosts)
        self.dtype = dtype_name(loaded.dtype)
        self.name, self.node = serve.get_replica_context().replica_id.unique_id, _node_ip()

        engine = self.engine

        @serve.multiplexed(max_num_models_per_replica=s.max_users_per_replica)
        async def user_slot(user: str) -> _UserSlot:
            return _UserSlot(engine, user)

        self._user_slot = user_slot
        self._board, self._started, self._stop = board, time.time(), threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="fedprefix-report", daemon=True)
        self._reporter.start()

    async def call(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
        """Run one HTTP request through this replica's app: ("start", status, headers), then body chunks."""
        user = serve.get_multiplexed_model_id()
        async for item in asgi_call(self.app, method, path, query, headers, body):
            if user and isinstance(item, tuple) and item[1] < 400:
                # tells Ray's router this replica holds the user: only once the app accepted the
                # request (key and body), so that refused requests cannot evict real users' slots
                await self._user_slot(user)
            yield item

    def snapshot(self) -> dict:
        """This replica's metrics (the single server's families) and health, for the board."""
        metrics = self.app.state.metrics
        metrics.render()  # brings the gauges and the batch-size histogram up to date
        families = families_of(metrics.registry)
        health = {"queue_depth": self.engine.queue_depth, "running": self.engine.batch_size}
        return {
            "replica": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "started": self._started,
            "dtype": self.dtype,
            "health": health,
            "families": families,
        }

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                self._board.report.remote(self.snapshot()).result(timeout_s=10)
            except Exception as exc:  # the board restarting: the next report fills it again
                log.debug("replica %s could not report: %s", self.name, exc)

    def __del__(self) -> None:
        """Serve's graceful shutdown: stop reporting, then the engine (unfinished requests fail)."""
        self._stop.set()
        try:
            self._board.forget.remote(self.name)
        except Exception:  # the application is going away as a whole
            pass
        self.engine.stop()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


async def asgi_call(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
    """Drive an ASGI app with one request, yielding ("start", status, headers) then the body's chunks.

    When the caller stops early (the client went away, so Ray cancels this call), the app
    receives http.disconnect, which cancels the request's prompts in the engine."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        finally:
            sent.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ("start", message["status"], message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except Exception:  # the app's own error was answered (500) and logged by Starlette
            pass


# ------------------------------------------------------------------ the application


def application(settings: ReplicaSettings) -> serve.Application:
    """The Ray Serve application: a router, `settings.replicas` engine replicas, their board."""
    from .replica_router import Router  # it imports this file's settings

    logging_config = {"log_level": "WARNING", "enable_access_log": False}
    plain = settings.model_dump()
    board = ReplicaBoard.options(logging_config=logging_config).bind()
    engine = (
        serve.deployment(EngineReplica)
        .options(
            name="EngineReplica",
            num_replicas=settings.replicas,
            # the engine queues and batches itself (429 past max_queue): let Ray hand it that many
            max_ongoing_requests=max(settings.max_queue + settings.max_batch_size, 1),
            # what waits in the router beyond that: requests not yet handed to a replica count too, so
            # the bound is what all replicas take plus max_queue; past it, 429 (BackPressureError)
            max_queued_requests=settings.replicas * (settings.max_queue + settings.max_batch_size) + settings.max_queue,
            ray_actor_options={"num_cpus": settings.replica_cpus},
            logging_config=logging_config,
            health_check_period_s=2,
            request_router_config={"request_router_class": UserAffinityRouter},
            graceful_shutdown_timeout_s=5,
        )
        .bind(plain, board)
    )
    # An engine replica busy computing answers Ray's queue-length probe late (its scheduler thread holds
    # the GIL); past the probe's deadline (0.1 s by default) Ray's router gives up on the replica that
    # holds the user and routes to another one: allow busy replicas a second.
    probe = {
        "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
        "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
    }
    router = {"num_cpus": 0, "runtime_env": {"env_vars": probe}}
    return Router.options(logging_config=logging_config, ray_actor_options=router).bind(plain, engine, board)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The `serve run` / Serve config entry point: `serve run fedprefix.coordinator.serving.replicas:build_app
    store=store replicas=2 base=tiny-llama` (any ReplicaSettings field as key=value)."""
    return application(ReplicaSettings.model_validate(args))


class _NotOurHttpOptions(logging.Filter):
    """Drops Ray's "The new client HTTP config differs from the existing one" warning: serve.run()
    compares its own default HTTP options with the proxy that serve.start() set up on our host and
    port, and warns on every start, though ours are the ones in use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "client HTTP config differs" not in record.getMessage()


def start(
    settings: ReplicaSettings,
    host: str,
    port: int,
    address: str | None = None,
    name: str = "fedprefix",
    after_init: Callable[[], None] | None = None,
    tls: dict | None = None,
) -> None:
    """Start Ray (a local one, or join the cluster at `address`), Serve's proxy on host:port, and the
    application; returns once every replica is up. `after_init` runs once Ray is up (the CLI sets its
    signal handlers there: ray.init sets its own). `tls`: Ray's ssl_certfile and ssl_keyfile (paths
    every proxy's node can read). Stop with `shutdown()`."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray never reports anywhere
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # and does not warn about GPUs it leaves alone
    serve_log = logging.getLogger("ray.serve")
    serve_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _NotOurHttpOptions) for f in serve_log.filters):
        serve_log.addFilter(_NotOurHttpOptions())
    if address is None:
        ray.init(
            num_cpus=usable_cores(),  # a container's CPU quota, not the host's cores
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # Ray raises many types for an address it cannot reach
            raise FedPrefixError(f"could not join the Ray cluster at {address!r}: {exc}") from exc
    if after_init is not None:
        after_init()
    http = {"host": host, "port": port, **{k: v for k, v in (tls or {}).items() if v is not None}}
    serve.start(http_options=http, logging_config={"log_level": "WARNING"})
    serve.run(application(settings), name=name, route_prefix="/", blocking=False)


def shutdown(local: bool = True, name: str = "fedprefix") -> None:
    """Stop what start() started: on a local Ray, Serve and Ray themselves; on a cluster, only this
    application (the cluster, its Serve and its other applications stay up); then disconnect."""
    import ray

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(name)
    finally:
        ray.shutdown()
