"""Every answer of the server names its request in `X-Request-Id`: the id the client (or a proxy in
front) sent, as vLLM's server and OpenAI's API carry one along, or a fresh one. A client, a proxy's
log and this server's log can then speak of the same request."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_USABLE = re.compile(rb"[!-~]{1,128}")  # printable ASCII, no spaces: safe to echo in a header and a log


def request_id(scope: Scope) -> str:
    """The id RequestIds gave this request ("-" outside it)."""
    return scope.get("state", {}).get("request_id", "-")


class RequestIds:
    """ASGI middleware: a request's one usable X-Request-Id header, or a new uuid, goes into its
    scope's state and onto its answer, whoever answers (the app, or a guard in front of it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = [value for name, value in scope["headers"] if name == HEADER]
        rid = given[0] if len(given) == 1 and _USABLE.fullmatch(given[0]) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, tagged)
