"""Open-loop HTTP load for the serving benchmark: Poisson arrivals, each request on a
keep-alive connection of its own while it runs.

Not httpx: its connection pool rescans every connection on each request it adds or
removes (quadratic in the requests in flight) and holds at most 100 connections, so under
a load of a few hundred requests in flight the load generator, not the server, set the
pace, and the "open" loop was closed at 100 requests. Here each request takes an idle
connection or opens one (h11 speaks HTTP/1.1; asyncio's streams carry it), and returns it
when its reply is read: O(1) per request, no cap.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import h11


class NotAnswered(ConnectionError):
    """The server closed the connection before any of its reply came."""


class Connections:
    """Keep-alive HTTP/1.1 connections to one local server, one request at a time on each."""

    IDLE_S = 2.0  # reuse a connection idle at most this long: uvicorn closes them after 5 s

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter, h11.Connection]] = []

    async def post(self, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
        """POST `body` as JSON; (status, the reply's JSON). A reused connection the server closed
        before it answered (its keep-alive ran out as the request left) is retried on a new one."""
        data = json.dumps(body).encode()
        fields = [("Host", f"127.0.0.1:{self.port}"), ("Content-Type", "application/json")]
        fields += [("Content-Length", str(len(data))), *headers.items()]
        while self.idle:
            released, reader, writer, conn = self.idle.pop()
            if time.monotonic() - released < self.IDLE_S and not reader.at_eof():
                conn.start_next_cycle()
                try:
                    return await self._exchange(reader, writer, conn, path, fields, data)
                except NotAnswered:
                    continue
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return await self._exchange(reader, writer, h11.Connection(h11.CLIENT), path, fields, data)

    async def _exchange(self, reader, writer, conn: h11.Connection, path, fields, data) -> tuple[int, dict]:
        status = 0
        try:
            writer.write(conn.send(h11.Request(method="POST", target=path, headers=fields)))
            writer.write(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
            reply = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    reply += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        except (h11.RemoteProtocolError, ConnectionError) as error:
            writer.close()
            if status == 0:  # nothing of a reply came: the server closed the connection first
                raise NotAnswered from error
            raise
        except BaseException:
            writer.close()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            self.idle.append((time.monotonic(), reader, writer, conn))
        else:  # the server closes it
            writer.close()
        return status, json.loads(reply)

    def close(self) -> None:
        for _, _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


def poisson_load(port: int, headers: dict, prompts, max_tokens: int, rate: float, seconds: float, results) -> None:
    """Poisson arrivals at `rate` requests/s for `seconds` against the server on `port`, the i-th
    from the i-th user (round-robin over `headers`: user -> their request headers) with the
    i-th prompt; puts ([(latency, completion tokens, HTTP status)], wall seconds) on `results`.
    A refused request (429, the server's queue full) is counted, not raised."""
    rng = random.Random(1)
    users = list(headers)

    async def run():
        connections = Connections(port)

        async def one(i):
            user = users[i % len(users)]
            body = {"prompt": prompts[i % len(prompts)], "user": user, "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            status, reply = await asyncio.wait_for(connections.post("/v1/completions", body, headers[user]), 600)
            if status == 429:  # overloaded: an outcome of the load, not a failure of the benchmark
                return time.perf_counter() - started, 0, status
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {reply}")
            return time.perf_counter() - started, reply["usage"]["completion_tokens"], status

        tasks, t, i = [], 0.0, 0
        began = time.perf_counter()
        try:
            while t < seconds:
                await asyncio.sleep(max(0.0, began + t - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
                i += 1
                t += rng.expovariate(rate)
            done = await asyncio.gather(*tasks)
        finally:
            connections.close()
        return done, time.perf_counter() - began

    results.put(asyncio.run(run()))
