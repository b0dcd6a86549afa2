"""Per-request caps of the server, the body-size guard that enforces the first of them, and the
OpenAI-shaped error body that the server and the replicas' router both answer with.

One request, or one user, must not be able to slow or starve everybody else: every cap
here is checked before anything is queued or any key is derived. The defaults suit a
small shared server; `fedprefix serve` exposes each as an option.

    limits = ServingLimits(max_prompts=16, max_stops=8)
    app = create_app(engine, "tiny-llama", limits=limits)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServingLimits(BaseModel):
    """What one HTTP request may ask for (per-user queue and unlock limits live in the engine)."""

    model_config = ConfigDict(frozen=True)
    max_body_bytes: int = Field(1 << 20, ge=1)  # a larger body is answered 413 before it is parsed
    max_prompts: int = Field(16, ge=1)  # prompts in one /v1/completions request
    max_stops: int = Field(8, ge=0)  # stop strings in one request (OpenAI allows 4)
    max_stop_chars: int = Field(64, ge=1)  # characters of each stop string
    max_messages: int = Field(256, ge=1)  # turns in one chat request (the chat template runs on the event loop)


def check_request(limits: ServingLimits, prompts: int, stops: list[str]) -> tuple[str, str] | None:
    """The first cap a request breaks, as (field, reason); None where it keeps them all."""
    if prompts > limits.max_prompts:
        return "prompt", f"{prompts} prompts in one request, at most {limits.max_prompts} (send several requests)"
    if len(stops) > limits.max_stops:
        return "stop", f"{len(stops)} stop strings, at most {limits.max_stops}"
    for stop in stops:
        if len(stop) > limits.max_stop_chars:
            return "stop", f"a stop string of {len(stop)} characters, at most {limits.max_stop_chars}"
    return None


BODY_TIMEOUT_S = 30.0  # the longest wait for the next piece of a request body (nginx's client_body_timeout: 60)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 (by Content-Length, or
    while it streams in), and one whose next piece takes over `timeout_s` 408, without the app
    ever seeing it: uvicorn has no body timeout, so a client that sends half a body held its
    connection forever (an auditor's 100 such sockets, open until they left)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        refused: Callable[[Scope, int], None] | None = None,
        timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.refused = refused  # told of each refusal and its status (the server counts them in its metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send, 413, too_large_body(self.max_bytes))
        # Read the whole (bounded) body first, then replay it: a chunked body has no length.
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                return await self._refuse(scope, send, 408, body_timeout_body(self.timeout_s))
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, send, 413, too_large_body(self.max_bytes))
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # http.disconnect, for Request.is_disconnected()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, status: int, body: bytes) -> None:
        if self.refused is not None:
            self.refused(scope, status)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 408:  # the rest of the body may still come: the connection cannot serve another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error_body(status: int, message: str, code: str, field: str | None = None) -> dict:
    """An error answer in OpenAI's shape; `field` names the body field at fault."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": field, "code": code}  # param: null, as OpenAI's
    if field is not None:
        error |= {"fields": [{"field": f"body.{field}", "message": message}]}
    return {"error": error}


def too_large_body(max_bytes: int) -> bytes:
    """The 413 answer's body (also what the Ray Serve router of replicas.py answers)."""
    return json.dumps(error_body(413, f"request body larger than {max_bytes} bytes", "body_too_large")).encode()


def bad_host_answer(message: str) -> JSONResponse:
    """The 400 for a Host name the server does not answer (common.http_guards.host_refusal's
    `message`): what the server and the replicas' router both answer."""
    return JSONResponse(error_body(400, message, "bad_host"), 400)


def body_timeout_body(timeout_s: float) -> bytes:
    """The 408 answer's body: a request body whose next piece did not come within `timeout_s`."""
    message = f"request body not received: nothing came for {timeout_s:g} s"
    return json.dumps(error_body(408, message, "body_timeout")).encode()
