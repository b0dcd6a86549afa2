"""Engine replicas behind Ray Serve (`fedprefix serve --replicas 2`), on loopback: the same API as
the single server, users routed to the replica holding them, a killed replica, a clean stop.

One Ray start for the whole module: the real command runs once, in a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving import Engine
from fedprefix.coordinator.serving.replica_router import merge_metrics
from fedprefix.coordinator.serving.server import create_app
from fedprefix.coordinator.superlink import free_port

from tests.conftest import MARK, interruptible, marked_processes, random_prefix
from tests.coordinator.test_engine import key_of, reference, served  # noqa: F401  (fixture)
from tests.coordinator.test_server import SERVER_METRICS, header

USERS = ["alice", "bob", "carol", "u3", "u4", "u5"]


@pytest.fixture(scope="module")
def replicated(served, tmp_path_factory):  # noqa: F811
    """`fedprefix serve --replicas 2` over the served store (plus three more users); its URL, the
    process, its processes' mark and the file holding its stderr."""
    base, store = served
    errors = tmp_path_factory.mktemp("replicas") / "stderr.txt"
    log = errors.open("w")
    for seed, user in enumerate(USERS[3:], start=10):
        store.save(user, random_prefix(base, 3, seed=seed, scale=3.0), key_of(user))
    mark, port = uuid.uuid4().hex, free_port()
    cli = [str(Path(sys.executable).with_name("fedprefix")), "serve", "--base", "tiny-llama", "--dtype", "float32"]
    server = subprocess.Popen(
        [*cli, "--store", str(store.root), "--port", str(port), "--replicas", "2", "--replica-cpus", "0.5"]
        + ["--max-users-per-replica", "8"],  # few: refused requests must not evict real users (a test below)
        env={**os.environ, MARK: mark, "RAY_USAGE_STATS_ENABLED": "0"},
        preexec_fn=interruptible,
        stderr=log,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200 and len(health.json()["replicas"]) == 2:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the replicas did not come up"
            time.sleep(0.5)
        yield url, server, mark, errors
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for process in marked_processes(mark):  # never leave Ray behind, even when a test failed
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def single(served):  # noqa: F811
    """The single-process server over the same store: what the replicas must answer like."""
    base, store = served
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "tiny-llama")) as client:
        yield client


def completion(user, prompt="hello", **fields):
    return {"prompt": prompt, "user": user, "max_tokens": 6, "temperature": 0, **fields}


def replica_counts(url: str) -> dict[str, float]:
    """Prefix-cache lookups (hits + misses) per replica, from the router's /metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fedprefix_replica_prefix_cache{") and ('stat="hits"' in line or 'stat="misses"' in line):
            replica = line.split('replica="')[1].split('"')[0]
            counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def lookups_after(url: str, before: dict[str, float], expected: int) -> dict[str, float]:
    """Per-replica lookups since `before`, once the replicas' reports show `expected` of them."""
    deadline = time.monotonic() + 30  # replicas report every 0.5 s, later under load
    while True:
        now = replica_counts(url)
        delta = {r: now.get(r, 0.0) - before.get(r, 0.0) for r in now}
        if sum(max(d, 0.0) for d in delta.values()) >= expected or time.monotonic() > deadline:
            return delta
        time.sleep(0.2)


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await asyncio.gather(
            *[http.post("/v1/completions", json=b, headers=header(b["user"]) if b.get("user") else {}) for b in bodies]
        )


def test_answers_as_the_single_server(replicated, single, served):  # noqa: F811
    base, store = served
    url = replicated[0]
    reply = httpx.post(f"{url}/v1/completions", json=completion("bob"), headers=header("bob"), timeout=60)
    expected = base.tokenizer.decode(reference(base, store, "hello", "bob", SamplingParams(max_new_tokens=6)))
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
    alone = single.post("/v1/completions", json=completion("bob"), headers=header("bob"))
    assert reply.json()["usage"] == alone.json()["usage"]

    with httpx.stream(
        "POST", f"{url}/v1/completions", json=completion("bob", stream=True), headers=header("bob"), timeout=60
    ) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == expected

    chat = {"messages": [{"role": "user", "content": "hi"}], "user": "carol", "max_tokens": 5, "temperature": 0}
    ours = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=header("carol"), timeout=60).json()
    theirs = single.post("/v1/chat/completions", json=chat, headers=header("carol")).json()
    assert ours["choices"] == theirs["choices"] and ours["usage"] == theirs["usage"]

    errors = [
        ("/v1/completions", completion("bob"), {}),  # 401 missing key
        ("/v1/completions", completion("bob"), header("alice")),  # 403 wrong key
        ("/v1/completions", completion("nobody"), header("alice")),  # 404 unknown user
        ("/v1/completions", {"prompt": "x", "max_tokens": 0, "temperature": "hot"}, {}),  # 400
        ("/v1/completions", completion("bob"), {"X-Prefix-Key": "b64:%%%"}),  # 400 bad key header
        ("/v1/completions", completion("bob", prompt="x" * (2 << 20)), {}),  # 413
        ("/v1/chat/completions", {"messages": []}, {}),  # 400
    ]
    # user ids that are no store's: a lone surrogate (valid JSON) hung the router; a long one was kept
    errors += [("/v1/completions", completion(user), header("bob")) for user in ("\ud800", "A" * 1000, "a/b")]
    for path, body, headers in errors:
        raw = {"content": json.dumps(body), "headers": {**headers, "Content-Type": "application/json"}}
        ours = httpx.post(f"{url}{path}", **raw, timeout=60)
        theirs = single.post(path, **raw)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), (path, theirs.status_code)
    assert httpx.get(f"{url}/v1/models").json() == single.get("/v1/models").json()
    assert httpx.get(f"{url}/nowhere").status_code == 404
    for method in ("TRACE", "PUT"):  # a method nobody serves: the single server's 405, not FastAPI's
        ours, theirs = httpx.request(method, f"{url}/v1/completions"), single.request(method, "/v1/completions")
        assert (ours.status_code, ours.json(), ours.headers.get("allow")) == (
            theirs.status_code,
            theirs.json(),
            theirs.headers.get("allow"),
        )
    assert 'fedprefix_requests_total{endpoint="/v1/completions",status="413"}' in httpx.get(f"{url}/metrics").text
    moved = httpx.post(f"{url}/v1/completions/", json=completion("bob"), headers=header("bob"), timeout=60)
    assert moved.status_code == 307 and moved.headers["location"] == f"{url}/v1/completions"


def test_refused_requests_do_not_evict_users(replicated):
    """A replica holds at most 8 users here: 20 strangers' keyless requests (401) must not push out
    the users it holds, whose decrypted prefixes it would then drop."""
    url = replicated[0]
    replies = asyncio.run(_post_all(url, [completion(u) for u in USERS]))
    assert all(r.status_code == 200 for r in replies)
    deadline = time.monotonic() + 30
    while (held := _cached_prefixes(url)) < len(USERS):  # replicas report their caches every 0.5 s
        assert time.monotonic() < deadline, f"the replicas report {held} cached prefixes"
        time.sleep(0.2)
    refused_before = _metric(url, 'fedprefix_requests_total{endpoint="/v1/completions",status="401"}')
    for i in range(20):
        assert httpx.post(f"{url}/v1/completions", json=completion(f"stranger{i}"), timeout=60).status_code == 401
    deadline = time.monotonic() + 30  # a report made after the strangers: it counts their 401s
    while _metric(url, 'fedprefix_requests_total{endpoint="/v1/completions",status="401"}') < refused_before + 20:
        assert time.monotonic() < deadline, "no replica report counts the strangers' requests"
        time.sleep(0.2)
    assert _cached_prefixes(url) >= held >= len(USERS)


def _metric(url: str, series: str) -> float:
    """One series of the router's merged /metrics; 0 where it is not there (yet)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _cached_prefixes(url: str) -> float:
    return _metric(url, 'fedprefix_prefix_cache{stat="entries"}')


def test_health_and_metrics_sum_the_replicas(replicated):
    url = replicated[0]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama" and len(health["replicas"]) == 2
    text = httpx.get(f"{url}/metrics").text
    for name in (*SERVER_METRICS, 'fedprefix_replica_prefix_cache{replica="'):
        assert name in text
    # on loopback, as the single server: a rebound name is refused by the router and the replicas
    rebound = {"host": "evil.example"}
    for answer in (
        httpx.get(f"{url}/health", headers=rebound),
        httpx.get(f"{url}/metrics", headers=rebound),
        httpx.post(f"{url}/v1/completions", json=completion("alice"), headers={**header("alice"), **rebound}),
    ):
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_host", answer.text
    named = httpx.post(
        f"{url}/v1/completions", json=completion("alice"), headers={**header("alice"), "X-Request-Id": "r-1"}
    )
    assert named.status_code == 200 and named.headers.get_list("x-request-id") == ["r-1"]  # once: Ray's proxy names it


def test_users_stay_on_their_replica(replicated):
    url = replicated[0]
    asyncio.run(_post_all(url, [completion(u) for u in USERS for _ in range(3)]))  # warm-up
    time.sleep(1.0)  # replicas announce their users to Ray's routers
    placement = {}
    for user in USERS:
        before = replica_counts(url)
        replies = asyncio.run(_post_all(url, [completion(user, prompt=f"p{i}") for i in range(20)]))
        assert all(r.status_code == 200 for r in replies)
        delta = lookups_after(url, before, 20)
        placement[user], top = max(delta.items(), key=lambda item: item[1])
        assert top / sum(delta.values()) >= 0.95, (user, delta)
    assert len(set(placement.values())) == 2, f"both replicas hold users: {placement}"
    # a mixed burst, where Ray once handed a replica chosen for one user to another user's request
    before = replica_counts(url)
    replies = asyncio.run(_post_all(url, [completion(u, prompt=f"m{i}") for i in range(5) for u in USERS]))
    assert all(r.status_code == 200 for r in replies)
    delta = lookups_after(url, before, 5 * len(USERS))
    assert delta == {r: 5.0 * list(placement.values()).count(r) for r in delta}, (delta, placement)


def test_a_killed_replica_moves_its_users_and_fails_nobody_else(replicated):
    url = replicated[0]
    before = replica_counts(url)
    asyncio.run(_post_all(url, [completion("alice")]))
    victim = max(lookups_after(url, before, 1).items(), key=lambda item: item[1])[0]
    pid = next(r["pid"] for r in httpx.get(f"{url}/health").json()["replicas"] if r["replica"] == victim)

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            killed = [float("inf")]

            def more(user, replies, until):
                """Until `until`; alice on until a request of hers sent after the kill is answered."""
                if time.monotonic() < until:
                    return True
                return user == "alice" and not any(sent > killed[0] for sent, _ in replies) and time.monotonic() < cap

            async def user_loop(user, until):
                replies = []
                while more(user, replies, until):
                    sent = time.monotonic()
                    reply = await http.post("/v1/completions", json=completion(user), headers=header(user))
                    replies.append((sent, reply.status_code))
                return user, replies

            until, cap = time.monotonic() + 8, time.monotonic() + 90
            tasks = [asyncio.ensure_future(user_loop(u, until)) for u in USERS]
            await asyncio.sleep(2)
            os.kill(pid, signal.SIGKILL)
            killed[0] = time.monotonic()
            return killed[0], dict(await asyncio.gather(*tasks))

    killed, results = asyncio.run(load())
    failed = {u: [s for _, s in r if s != 200] for u, r in results.items()}
    assert not any(failed.values()), failed
    after = [s for _, s in results["alice"] if _ > killed]
    assert after and all(s == 200 for s in after), "alice's requests after the kill"
    reply = httpx.post(f"{url}/v1/completions", json=completion("alice"), headers=header("alice"), timeout=60)
    assert reply.status_code == 200


def test_wrong_keys_for_a_user_meet_one_wrong_key_budget(replicated, served):  # noqa: F811
    """16 concurrent wrong keys for a user no replica holds yet: Ray places them all on one replica,
    so they meet one wrong-key budget (--max-wrong-keys 5 here), not one per replica."""
    base, store = served
    store.save("guessed", random_prefix(base, 3, seed=99), key_of("guessed"))

    async def guesses() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=replicated[0], timeout=120) as http:
            body, wrong = completion("guessed"), header("alice")
            return await asyncio.gather(*[http.post("/v1/completions", json=body, headers=wrong) for _ in range(16)])

    statuses = sorted(reply.status_code for reply in asyncio.run(guesses()))
    assert statuses == [403] * 5 + [429] * 11, statuses


def test_stops_cleanly_leaving_no_ray_process(replicated):
    url, server, mark, errors = replicated
    assert marked_processes(mark), "Ray's processes carry the mark"
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, "Ctrl-C must stop the replicas cleanly"
    # Ray Serve warned on every start that its own default HTTP options were ignored for ours
    assert "HTTP config differs" not in errors.read_text(), errors.read_text()[-2000:]
    deadline = time.monotonic() + 30
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.name()) for p in left]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_invalid_replica_count_is_a_clear_error(tmp_path):
    from fedprefix.coordinator.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path), "--replicas", "0"])
    assert result.exit_code == 2 and "'--replicas': 0 is not in the range x>=1" in result.output


def test_replicas_from_a_python_whose_path_has_a_space_are_refused_at_once_by_name(tmp_path, monkeypatch):
    """Ray starts the Router's worker through a shell with the interpreter's path unquoted: from
    "~/My Projects" `serve --replicas 2` printed nothing and never answered (minutes, then SIGTERM)."""
    import ray
    from fedprefix.coordinator.cli import app
    from typer.testing import CliRunner

    monkeypatch.setattr(sys, "executable", "/home/me/My Projects/fedprefix/.venv/bin/python")
    cli = ["serve", "--base", "tiny-llama", "--store", str(tmp_path), "--replicas", "2", "--port", str(free_port())]
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 1 and "holds ' ', which Ray's workers cannot start from" in result.output
    assert not ray.is_initialized()


def test_more_replicas_than_the_memory_holds_are_refused_before_ray_starts(tmp_path, monkeypatch):
    """Replicas whose bases do not fit are refused at once, naming how many would (the kernel
    killed one, Ray started it again, and the machine never answered); replicas whose caches,
    once full, would not fit start with a warning."""
    import ray
    from fedprefix.common import resources
    from fedprefix.common.errors import FedPrefixError
    from fedprefix.coordinator.cli import app
    from fedprefix.coordinator.serving.replica_sizing import GIB, SERVE_BYTES, check_replicas_fit, replica_memory
    from typer.testing import CliRunner

    built_in, caches = 134_515_008, 1280
    each, bare = replica_memory(built_in, caches), replica_memory(built_in)
    assert 2.5 * GIB < each < 3 * GIB and 1.4 * GIB < bare < 1.6 * GIB
    assert check_replicas_fit(2, built_in, caches, SERVE_BYTES + 2 * each) is None
    assert check_replicas_fit(64, built_in, caches, None) is None  # free memory unknown (no figure): not checked
    warned = check_replicas_fit(3, built_in, caches, SERVE_BYTES + 2 * each)
    assert "3 replicas need about" in warned and "caches full" in warned and "2 would fit" in warned
    with pytest.raises(FedPrefixError, match=r"3 replicas need about .* is free: 2 would fit; use fewer --replicas"):
        check_replicas_fit(3, built_in, caches, SERVE_BYTES + 2 * bare + bare // 2)
    monkeypatch.setattr(resources, "available_memory", lambda: 2 * GIB)
    cli = ["serve", "--base", "tiny-llama", "--store", str(tmp_path), "--replicas", "4", "--port", str(free_port())]
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 1 and "4 replicas need about" in result.output and "--replicas" in result.output
    assert not ray.is_initialized()


def test_merge_sums_families_and_labels_replicas():
    gauge = ("fedprefix_queue_depth", "Requests waiting", "gauge", [("fedprefix_queue_depth", {}, 2.0)])
    reports = [{"replica": "a", "families": [gauge]}, {"replica": "b", "families": [gauge]}]
    merged = {name: samples for name, _, _, samples in merge_metrics(reports, [])}
    assert merged["fedprefix_queue_depth"] == [("fedprefix_queue_depth", {}, 4.0)]
    assert ("fedprefix_replica_queue_depth", {"replica": "b"}, 2.0) in merged["fedprefix_replica_queue_depth"]


def test_serve_run_builder_reads_string_settings_and_names_bad_ones(tmp_path):
    """`serve run ...:build_app key=value` and a Serve config pass strings; a bad one is a clear error."""
    from fedprefix.coordinator.serving.replicas import build_app
    from pydantic import ValidationError
    from ray import serve

    app = build_app({"store": str(tmp_path), "replicas": "3", "max_prefill_tokens": "512", "prompt_cache_mib": "0"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValidationError, match="max_prefill_tokens"):
        build_app({"store": str(tmp_path), "max_prefill_tokens": "0"})
    with pytest.raises(ValidationError, match="replica_count"):
        build_app({"store": str(tmp_path), "replica_count": "2"})  # a misspelt field is refused, not ignored


def test_the_router_routes_only_valid_user_ids():
    from fedprefix.coordinator.serving.replica_router import _user_of

    assert _user_of(b'{"user": "alice"}') == "alice"
    for body in (b'{"user": "\\ud800"}', b'{"user": "a/b"}', json.dumps({"user": "A" * 200}).encode(), b"[1]", b"{"):
        assert _user_of(body) is None, body


def test_a_stream_whose_replica_dies_ends_with_an_error_event():
    from fedprefix.coordinator.serving.replica_router import _relay
    from ray.exceptions import RayActorError

    async def dying():
        yield b'data: {"choices": []}\n\n'
        raise RayActorError()

    async def relayed():
        return [chunk async for chunk in _relay(dying())]

    chunks = b"".join(asyncio.run(relayed())).decode()
    events = [line[6:] for line in chunks.splitlines() if line.startswith("data: ")]
    assert json.loads(events[1])["error"]["code"] == "replica_unavailable" and events[-1] == "[DONE]"


def test_the_router_answers_429_when_every_replica_and_its_wait_are_full(tmp_path):
    """Ray Serve raises BackPressureError past max_queued_requests: the single server's 429, counted."""
    from fastapi import Request
    from fedprefix.coordinator.serving.replica_router import Router
    from fedprefix.coordinator.serving.replicas import ReplicaSettings
    from ray.serve.exceptions import BackPressureError

    class FullStream:
        async def __anext__(self):
            raise BackPressureError(num_queued_requests=9, max_queued_requests=9)

    class FullHandle:  # stands in for the engine replicas' DeploymentHandle
        def options(self, **_):
            return self

        def __getattr__(self, name):  # handle.call.remote(...)
            return self

        def remote(self, *args):
            return FullStream()

    router = object.__new__(Router.func_or_class)
    Router.func_or_class.__mro__[1].__init__(
        router, ReplicaSettings(store=str(tmp_path)).model_dump(), FullHandle(), None
    )
    body = json.dumps(completion("alice")).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    reply = asyncio.run(router.forward(Request(scope, receive)))
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert json.loads(reply.body)["error"]["code"] == "overloaded"
    assert router.failures.labels("/v1/completions", "429")._value.get() == 1


def test_a_cluster_address_ray_cannot_join_is_named_in_the_error(tmp_path, monkeypatch):
    """Ray's own error ("Module: bogus does not exist") was hidden behind the one Serve's shutdown
    raised after it, which never named the address."""
    import ray
    from fedprefix.common.errors import FedPrefixError
    from fedprefix.coordinator.serving import replicas

    def cannot_join(*args, **kwargs):
        raise ValueError("Module: bogus does not exist.")

    monkeypatch.setattr(ray, "init", cannot_join)
    with pytest.raises(FedPrefixError, match=r"^could not join the Ray cluster at 'bogus://x': Module: bogus"):
        replicas.start(replicas.ReplicaSettings(store=str(tmp_path)), "127.0.0.1", 1, address="bogus://x")
