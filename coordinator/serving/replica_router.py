"""The HTTP ingress of the Ray Serve application (replicas.py): routes each request by the user its
body names, relays the replica's answer, and answers /metrics and /health for all replicas.

The router holds no model and no key: it reads the body's `user` (bounded like the single server's
body, 413 past the cap), forwards the raw request, `X-Prefix-Key` included, to an engine replica
with the user as Ray Serve's multiplexed model id, and relays status, headers and body (streams
as they come). A replica that died before answering is tried again (ATTEMPTS); then 503.
"""

# No `from __future__ import annotations`: Ray Serve rebuilds the router's FastAPI routes from
# their signatures, and cannot resolve string annotations there (a `request: Request` became a query field).
import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.http_guards import host_refusal
from fedprefix.common.store import validate_user_id
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from .limits import bad_host_answer, error_body, too_large_body
from .metrics import Family, families_of
from .replicas import ATTEMPTS, DROPPED_HEADERS, ReplicaSettings
from .request_ids import HEADER as REQUEST_ID_HEADER

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ the router's helpers

# The helpers the router's routes call come first: @serve.ingress pickles the FastAPI app with
# its routes when the class is decorated, and with them only the globals defined by then.


ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


async def _relay(stream) -> AsyncIterator[bytes]:
    """A stream's remaining chunks; a replica dying mid-stream ends it with an error event, as the
    single server ends a stream whose generation failed (the status line said 200 long ago)."""
    try:
        async for chunk in stream:
            yield chunk
    except (RayActorError, ActorUnavailableError) as exc:
        log.warning("a replica failed mid-stream: %s", type(exc).__name__)
        error = error_body(
            503, f"the replica serving this stream failed ({type(exc).__name__}); retry", "replica_unavailable"
        )
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


async def _bounded_body(request: Request, max_bytes: int) -> bytes | None:
    """The whole body, or None once it is known to be larger than max_bytes (the single server's 413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _user_of(body: bytes) -> str | None:
    """The body's `user`, the routing key; None where there is none or it is no valid user id (the
    replica judges the body: 400, as the single server), so that no odd id reaches Ray's routing."""
    try:
        user = json.loads(body).get("user")
        return validate_user_id(user)
    except (ValueError, AttributeError, RecursionError, FedPrefixError):  # RecursionError: JSON nested too deep
        return None


# ------------------------------------------------------------------ metrics of all replicas


def merge_metrics(reports: list[dict], own: list[Family]) -> list[Family]:
    """The single server's families summed over replicas (plus the router's own requests), and
    per replica as `fedprefix_replica_*` families labelled `replica`.

    Per-replica series get a family of their own so that a PromQL sum over a family never
    counts a replica twice. A replica that dies takes its counts with it (a counter reset)."""
    summed: dict[str, tuple[str, str, dict]] = {}
    per_replica: dict[str, tuple[str, str, list]] = {}

    def add(name: str, doc: str, kind: str, samples) -> None:
        total = summed.setdefault(name, (doc, kind, {}))[2]
        for sample, labels, value in samples:
            key = (sample, tuple(sorted(labels.items())))
            total[key] = total.get(key, 0.0) + value

    for report in reports:
        for name, doc, kind, samples in report["families"]:
            samples = [s for s in samples if not s[0].endswith("_created")]  # timestamps do not add up
            add(name, doc, kind, samples)
            mine = per_replica.setdefault(_replica_name(name), (f"{doc}, per replica", kind, []))[2]
            mine.extend((_replica_name(s), {**labels, "replica": report["replica"]}, v) for s, labels, v in samples)
    for name, doc, kind, samples in own:
        add(name, doc, kind, [s for s in samples if not s[0].endswith("_created")])
    families = [
        (name, doc, kind, [(sample, dict(labels), value) for (sample, labels), value in samples.items()])
        for name, (doc, kind, samples) in summed.items()
    ]
    return families + [(name, doc, kind, samples) for name, (doc, kind, samples) in per_replica.items()]


def _replica_name(name: str) -> str:
    return "fedprefix_replica_" + name.removeprefix("fedprefix_")


class _Families:
    """A prometheus_client collector over merged families (what generate_latest renders)."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for name, doc, kind, samples in self.families:
            metric = Metric(name, doc, kind)
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
            yield metric


# ------------------------------------------------------------------ the router (HTTP ingress)

_http = FastAPI(title="fedprefix serving (Ray Serve router)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(_http)
class Router:
    """The HTTP ingress: routes each request by its body's `user`, relays the replica's answer."""

    def __init__(self, settings: dict, engine, board) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.settings = ReplicaSettings.model_validate(settings)
        self.engine, self.board = engine, board
        self.registry = CollectorRegistry()
        self.failures = Counter(  # answered by the router itself: no replica could take the request
            "fedprefix_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )

    def _foreign_host(self, request: Request) -> JSONResponse | None:
        """The single server's 400 for a Host name it does not answer (replicas check their own requests)."""
        message = host_refusal(request.scope["headers"], self.settings.allowed_hosts)
        if message is None:
            return None
        self.failures.labels(request.url.path, "400").inc()
        return bad_host_answer(message)

    @_http.get("/health")
    async def health(self, request: Request):
        if refused := self._foreign_host(request):
            return refused
        reports = await self.board.live.remote()
        if not reports:
            return JSONResponse({"status": "unavailable", "model": self.settings.model_name, "replicas": []}, 503)
        return {
            "status": "ok",
            "model": self.settings.model_name,
            "dtype": reports[0]["dtype"],
            "queue_depth": sum(r["health"]["queue_depth"] for r in reports),
            "running": sum(r["health"]["running"] for r in reports),
            "replicas": [{"replica": r["replica"], "node": r["node"], "pid": r["pid"], **r["health"]} for r in reports],
        }

    @_http.get("/metrics")
    async def metrics(self, request: Request):
        from prometheus_client import generate_latest

        if refused := self._foreign_host(request):
            return refused
        reports = await self.board.live.remote()
        text = generate_latest(_Families(merge_metrics(reports, families_of(self.registry))))
        return Response(text, media_type="text/plain; version=0.0.4")

    @_http.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE"])
    async def forward(self, request: Request):
        limit = self.settings.limits.max_body_bytes
        body = await _bounded_body(request, limit)
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"  # the single server's labels
        if body is None:
            self.failures.labels(endpoint, "413").inc()
            return Response(too_large_body(limit), 413, media_type="application/json")
        user = _user_of(body) if endpoint != "other" else None
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() not in DROPPED_HEADERS]
        call = (request.method, request.url.path, request.scope.get("query_string", b""), headers, body)
        handle = self.engine.options(stream=True, **({"multiplexed_model_id": user} if user else {}))
        failure = None
        for attempt in range(ATTEMPTS):
            stream = handle.call.remote(*call)
            try:
                _, status, response_headers = await stream.__anext__()
                # Ray Serve's proxy names every answer's request itself (X-Request-ID): not twice
                kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in response_headers if k != REQUEST_ID_HEADER}
                if kept.get("content-type", "").startswith("text/event-stream"):
                    return StreamingResponse(_relay(stream), status_code=status, headers=kept)
                chunks = [chunk async for chunk in stream]
                kept.pop("content-length", None)  # Response sets it again
                return Response(b"".join(chunks), status_code=status, headers=kept)
            except BackPressureError:  # every replica the request could go to is full, and so is the wait
                self.failures.labels(endpoint, "429").inc()
                message = "the server is overloaded (every replica's queue is full); retry later"
                return JSONResponse(error_body(429, message, "overloaded"), 429, headers={"Retry-After": "1"})
            except (RayActorError, ActorUnavailableError) as exc:  # the replica died: nothing reached the client
                failure = exc
                log.warning("a replica failed (attempt %d of %d): %s", attempt + 1, ATTEMPTS, type(exc).__name__)
                await asyncio.sleep(0.2 * 2**attempt)
        self.failures.labels(endpoint, "503").inc()
        message = f"no serving replica could answer ({type(failure).__name__}); retry shortly"
        return JSONResponse(error_body(503, message, "replica_unavailable"), 503, headers={"Retry-After": "1"})
