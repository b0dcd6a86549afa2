"""The serving benchmark's load generator is open: hundreds of requests in flight at once,
connections reused, a connection the server closed while idle retried, 429s counted."""

import asyncio
import json
import queue

import pytest
from fedprefix.simulations.http_load import Connections, poisson_load

from tests.coordinator.test_server import LoopbackServer


class App:
    """Answers every POST with {"usage": ...}; holds replies until `hold` requests are in flight."""

    def __init__(self, hold: int = 1, refuse_every: int = 0) -> None:
        self.hold, self.refuse_every = hold, refuse_every
        self.in_flight = self.most_in_flight = self.seen = 0
        self.clients: set = set()
        self.released: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        self.released = self.released or asyncio.Event()
        while (await receive()).get("more_body"):
            pass
        self.clients.add(scope["client"])
        self.seen += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= self.hold:
            self.released.set()
        await self.released.wait()
        self.in_flight -= 1
        status = 429 if self.refuse_every and self.seen % self.refuse_every == 0 else 200
        body = json.dumps({"usage": {"completion_tokens": 3}}).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def serve():
    started = []

    def start(app, keep_alive_s: float = 5):
        server = LoopbackServer(app, timeout_keep_alive=keep_alive_s)
        server.__enter__()
        started.append(server)
        return server.port

    yield start
    for server in started:
        server.__exit__(None, None, None)


def test_hundreds_of_requests_are_in_flight_at_once(serve):
    app = App(hold=250)  # no reply until all 250 arrived: a pool capped at 100 would hang here
    port = serve(app)

    async def run():
        connections = Connections(port)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(connections.post("/v1/completions", {"i": i}, {}) for i in range(250))), 30
            )
        finally:
            connections.close()

    replies = asyncio.run(run())
    assert app.most_in_flight == 250 and all(r == (200, {"usage": {"completion_tokens": 3}}) for r in replies)


def test_connections_are_reused_and_one_closed_while_idle_is_retried(serve):
    app = App()
    port = serve(app, keep_alive_s=1.0)

    async def run():
        connections = Connections(port)
        try:
            for _ in range(3):
                assert await connections.post("/x", {}, {}) == (200, {"usage": {"completion_tokens": 3}})
            assert len(app.clients) == 1  # one connection for all three
            await asyncio.sleep(2.0)  # the server closes it; the client still holds it as idle
            assert await connections.post("/x", {}, {}) == (200, {"usage": {"completion_tokens": 3}})
        finally:
            connections.close()

    asyncio.run(run())
    assert app.seen == 4 and len(app.clients) == 2


def test_the_open_loop_counts_refused_requests_instead_of_failing(serve):
    port = serve(App(refuse_every=3))
    results = queue.Queue()
    poisson_load(port, {"u0": {}, "u1": {"X-Prefix-Key": "k"}}, ["a", "b"], 3, rate=200, seconds=0.3, results=results)
    done, wall = results.get(timeout=0)
    statuses = [status for _, _, status in done]
    assert len(done) > 20 and 0 < wall < 10
    assert statuses.count(429) == len(done) // 3 and set(statuses) == {200, 429}
    assert all(tokens == (3 if status == 200 else 0) for _, tokens, status in done)
