"""What the HTTP servers (`fedprefix serve` in one process, the dashboard) put in front of their apps.

- A Host check: a server bound to a loopback address answers only requests that name it by a
  loopback name. Browsers keep a web page from reading another origin's answers, but a page
  whose own host name the attacker re-points at 127.0.0.1 (DNS rebinding) is that origin:
  without the check it read the dashboard's run records and spent a user's wrong-key budget.
- A deadline for a request's headers: uvicorn times a connection only once it has answered
  on it, so a client that opened connections and sent nothing, or half a request line, held
  each one forever (an auditor's 240 such sockets made the dashboard refuse everyone else).
- TLS where the operator gives a certificate: keys travel in request headers.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Collection, Sequence

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ConfigError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # the names of this machine (simulate's NO_PROXY too)
HEADER_TIMEOUT_S = 30.0  # a request's line and headers must all come within this (nginx's client_header_timeout: 60)


def is_loopback(host: str) -> bool:
    """Whether a bind address is a loopback one (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().lower().rstrip(".").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind_host` answers (None: any).

    Bound to loopback: the loopback names and `extra` (a reverse proxy's public name; "*" lets
    every name in). Bound elsewhere: any name, unless `extra` lists them (the operator chose
    to expose the server; its clients may call it by any of its names or addresses)."""
    names = {host_name(name.encode()) for name in extra if name.strip()}
    if "*" in names:
        return None
    if is_loopback(bind_host):
        return frozenset({*LOOPBACK_NAMES, host_name(bind_host.encode()), *names})
    return frozenset(names) or None


def host_name(value: bytes) -> str:
    """The name in a Host header's value, without its port or a trailing dot: b'[::1]:8000' -> '::1'."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if text.endswith("]") or "]:" in text else text
    return (text.rsplit(":", 1)[0] if text.count(":") == 1 else text).rstrip(".")


class HostCheck:
    """ASGI middleware: a request without exactly one Host header naming an allowed host gets
    `refuse(scope, message)`'s answer (a 400) and never reaches the app."""

    def __init__(self, app: ASGIApp, allowed: Collection[str] | None, refuse: Callable[[Scope, str], Response]) -> None:
        self.app, self.allowed, self.refuse = app, allowed, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = host_refusal(scope["headers"], self.allowed) if scope["type"] in ("http", "websocket") else None
        if message is None:
            return await self.app(scope, receive, send)
        await self.refuse(scope, message)(scope, receive, send)


def host_refusal(headers: Sequence[tuple[bytes, bytes]], allowed: Collection[str] | None) -> str | None:
    """Why a request with these (lower-case) headers is refused by a server answering `allowed`
    Host names (None: any), or None."""
    if allowed is None:
        return None
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) != 1:
        return f"a request needs exactly one Host header, it has {len(hosts)}"
    if host_name(hosts[0]) not in allowed:  # the value is the client's, and may be anything: not echoed
        return "this server does not answer to that Host name (see --allowed-host)"
    return None


def header_timeout_protocol(timeout_s: float = HEADER_TIMEOUT_S, expired: Callable[[], None] | None = None) -> type:
    """uvicorn's httptools protocol with a deadline for each request's line and headers, for
    uvicorn.Config(http=...). On expiry the connection closes (a client that had started a
    request gets 408 first) and `expired()` is told."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):
        _deadline = None
        _began = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # which cancels uvicorn's keep-alive timer
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # bytes that start no request ("\r\n", or an unread body's tail) hold nothing open

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._began = False
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm()  # a pipelined request waits behind an answer still being sent (a stream)
                return
            if expired is not None:
                expired()
            if self._began:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    return HeaderDeadline


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """ConfigError unless both or neither are given and they load as a certificate chain and its key."""
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
    if certfile is not None:
        import ssl

        for path in (certfile, keyfile):
            if not os.path.isfile(path):
                raise ConfigError(f"TLS: {path} is not a file")

        def no_password() -> bytes:
            raise ConfigError(f"TLS: {keyfile} is encrypted; give an unencrypted key (readable by this user only)")

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, no_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use {certfile} with {keyfile} for TLS: {exc.strerror or exc}") from None


def uvicorn_server(
    app,
    host: str,
    port: int,
    certfile: str | None = None,
    keyfile: str | None = None,
    expired: Callable[[], None] | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
):
    """A uvicorn server for `app` with the headers deadline (`expired()` told of each expiry) and
    TLS where a certificate is given (check_tls first); warnings only in its log."""
    import uvicorn

    from .resources import raise_open_files_limit

    raise_open_files_limit()  # macOS starts at 256: a full queue's connections would get EMFILE, not 429
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=header_timeout_protocol(header_timeout_s, expired),
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    return uvicorn.Server(config)
