"""The OpenAI-compatible HTTP API: endpoints, status codes, streaming, the openai client, load."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from fedprefix.common.generation import SamplingParams
from fedprefix.common.http_guards import allowed_hosts
from fedprefix.coordinator.serving import Engine
from fedprefix.coordinator.serving.handoff import LoopHandoff
from fedprefix.coordinator.serving.server import KEY_HEADER, create_app, parse_key
from fedprefix.coordinator.superlink import free_port

from tests.conftest import interruptible
from tests.coordinator.test_engine import key_of, reference, served  # noqa: F401  (fixture)


def header(user: str) -> dict:
    return {KEY_HEADER: base64.b64encode(key_of(user)).decode()}


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "tiny-llama")) as test_client:
        yield test_client


def test_completion_equals_the_user_alone(client, served):  # noqa: F811
    base, store = served
    body = {"prompt": "hello", "user": "bob", "max_tokens": 8, "temperature": 0}
    reply = client.post("/v1/completions", json=body, headers=header("bob"))
    assert reply.status_code == 200, reply.text
    data = reply.json()
    expected = base.tokenizer.decode(reference(base, store, "hello", "bob", SamplingParams(max_new_tokens=8)))
    assert data["choices"][0]["text"] == expected and data["object"] == "text_completion"
    assert data["usage"]["completion_tokens"] == 8


def test_server_worker_threads_run_torch_on_one_thread(served):  # noqa: F811
    """They only prepare requests; a live thread with an OpenMP pool of its own slows the engine."""
    base, store = served
    seen = []
    with Engine(base, store=store) as engine:
        submit_many = engine.submit_many
        engine.submit_many = lambda *args: seen.append(torch.get_num_threads()) or submit_many(*args)
        with TestClient(create_app(engine, "tiny-llama")) as test_client:
            body = {"prompt": "hello", "user": "bob", "max_tokens": 2}
            assert test_client.post("/v1/completions", json=body, headers=header("bob")).status_code == 200
    assert seen == [1] and torch.get_num_threads() == engine._threads  # the caller's own setting is untouched


def test_streaming_gives_the_same_text(client):
    body = {"prompt": "stream", "user": "alice", "max_tokens": 12, "temperature": 0.8, "seed": 3}
    whole = client.post("/v1/completions", json=body, headers=header("alice")).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=header("alice")) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_plain_request_wakes_the_event_loop_once_a_stream_once_per_piece(client, monkeypatch):
    """As vLLM's FINAL_ONLY outputs: a non-streamed request's text pieces never reach the loop."""
    put = []
    original = LoopHandoff._put
    monkeypatch.setattr(LoopHandoff, "_put", lambda self, queue, item: (put.append(item), original(self, queue, item)))
    body = {"prompt": ["one", "two"], "user": "alice", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=body, headers=header("alice")).json()
    assert put == [None, None] and all(choice["text"] for choice in plain["choices"])
    put.clear()
    streamed = {**body, "prompt": "one", "stream": True}
    with client.stream("POST", "/v1/completions", json=streamed, headers=header("alice")):
        pass
    assert put[-1] is None and "".join(put[:-1]) == plain["choices"][0]["text"]


def test_chat_stream_and_plain(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "user": "carol", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body, headers=header("carol")).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["role"] == "assistant"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=header("carol")) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_status_codes(client):
    ok = {"prompt": "x", "max_tokens": 2}
    assert client.post("/v1/completions", json=ok).status_code == 200  # no user: the base alone
    missing = client.post("/v1/completions", json={**ok, "user": "bob"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_key"
    wrong = client.post("/v1/completions", json={**ok, "user": "bob"}, headers=header("alice"))
    assert wrong.status_code == 403 and "wrong key" in wrong.json()["error"]["message"]
    guess = client.post("/v1/completions", json={**ok, "user": "bob"}, headers={"X-Prefix-Key": "a guessed phrase"})
    said = guess.json()["error"]["message"]  # the store's own words named the kind of key bob's prefix takes
    assert guess.status_code == 403 and "wrong key" in said and "raw" not in said and "passphrase" not in said
    unknown = client.post("/v1/completions", json={**ok, "user": "dave"}, headers=header("alice"))
    assert unknown.status_code == 404
    bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0, "temperature": "hot"})
    assert bad.status_code == 400
    fields = {f["field"] for f in bad.json()["error"]["fields"]}
    assert fields == {"body.max_tokens", "body.temperature"}
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400


def test_overload_is_429(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store, max_queue=0) as engine, TestClient(create_app(engine, "m")) as test_client:
        reply = test_client.post("/v1/completions", json={"prompt": "x"})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"


def test_before_the_engine_runs_health_and_requests_answer_503(served):  # noqa: F811
    """`fedprefix serve` listens before its engine loop starts: in that moment /health says
    not ready and a request is told to retry (503 + Retry-After), never a 500."""
    base, store = served
    with TestClient(create_app(Engine(base, store=store), "m")) as test_client:
        health = test_client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "not running"
        reply = test_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "engine_not_running"


def test_a_refused_request_runs_none_of_its_prompts(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store, max_queue=1) as engine, TestClient(create_app(engine, "m")) as test_client:
        two = {"prompt": ["a", "b"], "max_tokens": 2}
        assert test_client.post("/v1/completions", json=two).status_code == 429  # the queue holds one
        streamed = test_client.post("/v1/completions", json={"prompt": ["a"], "max_tokens": 2, "stream": True})
        assert streamed.status_code == 200
        refused = test_client.post("/v1/completions", json={**two, "stream": True})
        assert refused.status_code == 400 and "single prompt" in refused.json()["error"]["message"]
        one_bad_key = {"prompt": ["a", "b"], "user": "bob", "max_tokens": 2}
        assert test_client.post("/v1/completions", json=one_bad_key, headers=header("alice")).status_code == 403
        time.sleep(0.2)
        assert engine.stats.finished == 1 and engine.queue_depth == 0  # only the streamed prompt ran


# what /metrics shows after a user's requests (the replicated server's too, summed)
SERVER_METRICS = (
    "fedprefix_requests_total",
    "fedprefix_batch_size_bucket",
    "fedprefix_tokens_per_second",
    "fedprefix_queue_depth",
    'fedprefix_prefix_cache{stat="hits"}',
    'fedprefix_prompt_cache{stat="tokens_saved"}',
    "fedprefix_inter_token_seconds_bucket",
    "fedprefix_prefill_tokens",
    'fedprefix_kv_cache{stat="budget_bytes"}',
)


def test_models_health_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["dtype"] in ("float32", "bfloat16")
    assert health["device"] == "cpu" and health["cuda_graphs"] is None
    for _ in range(2):  # bob's second request reuses the KV of his first prompt
        body = {"prompt": "metrics, twice", "user": "bob", "max_tokens": 3}
        assert client.post("/v1/completions", json=body, headers=header("bob")).status_code == 200
    text = client.get("/metrics").text
    for name in SERVER_METRICS:
        assert name in text
    saved = re.search(r'fedprefix_prompt_cache\{stat="tokens_saved"\} (\S+)', text)
    hits = re.search(r'fedprefix_prompt_cache\{stat="hits"\} (\S+)', text)
    assert float(hits.group(1)) >= 1 and float(saved.group(1)) >= len("metrics, twice") - 1


def test_key_header_forms():
    raw = bytes(range(32))
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key("correct horse battery staple") == "correct horse battery staple"
    assert parse_key(None) is None


class LoopbackServer:
    """uvicorn on 127.0.0.1 in a thread, stopped on exit; `config`: more uvicorn.Config settings.

    Its socket is bound here, before uvicorn starts: a port picked free and bound later may
    be taken in between, and uvicorn's thread would then end without ever starting."""

    def __init__(self, app, **config):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def test_openai_client_and_concurrent_load(served):  # noqa: F811
    openai = pytest.importorskip("openai")
    base, store = served
    expected = {
        (user, prompt): base.tokenizer.decode(
            reference(base, store, prompt, user, SamplingParams(max_new_tokens=6)), skip_special_tokens=True
        )
        for user in ("alice", "bob", "carol")
        for prompt in ("p1", "another p2")
    }
    with Engine(base, store=store, max_batch_size=32, max_queue=512) as engine:
        with LoopbackServer(create_app(engine, "tiny-llama")) as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers=header("alice"))
            done = api.completions.create(model="tiny-llama", prompt="p1", max_tokens=6, temperature=0, user="alice")
            assert done.choices[0].text == expected[("alice", "p1")]
            chat = api.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, user="alice"
            )
            assert chat.choices[0].message.role == "assistant"
            stream = api.completions.create(
                model="tiny-llama", prompt="p1", max_tokens=6, temperature=0, user="alice", stream=True
            )
            assert "".join(c.choices[0].text for c in stream) == expected[("alice", "p1")]
            with pytest.raises(openai.PermissionDeniedError):
                api.completions.create(model="tiny-llama", prompt="p1", user="bob", max_tokens=2)

            async def load():
                cases = [(u, p) for (u, p) in expected for _ in range(50)]  # 300 requests
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    replies = await asyncio.gather(
                        *[
                            http.post(
                                "/v1/completions",
                                headers=header(u),
                                json={"prompt": p, "user": u, "max_tokens": 6, "temperature": 0},
                            )
                            for u, p in cases
                        ]
                    )
                return cases, replies

            cases, replies = asyncio.run(load())
    assert all(r.status_code == 200 for r in replies)
    assert all(r.json()["choices"][0]["text"] == expected[case] for case, r in zip(cases, replies, strict=True))
    assert max(engine.stats.batch_sizes) > 1, "concurrent requests must share batches"


def test_serve_refuses_an_unknown_dtype_before_binding(tmp_path):
    from fedprefix.coordinator.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["serve", "--base", "tiny-llama", "--store", str(tmp_path), "--dtype", "fp8"])
    assert result.exit_code == 2  # a value --dtype cannot take: a usage error
    assert "'fp8' is not one of auto, float32, bfloat16" in result.output


def interruptible_with_core_dumps() -> None:
    """interruptible(), started as a shell that allows core files (`ulimit -c unlimited`) would."""
    import resource

    interruptible()
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (1 << 30 if hard == resource.RLIM_INFINITY else hard, hard))


def test_fedprefix_serve_answers_refuses_a_taken_port_and_stops_on_ctrl_c(served):  # noqa: F811
    """The real command: engine on the main thread, HTTP on another; both end on SIGINT."""
    base, store = served
    cli = [str(Path(sys.executable).with_name("fedprefix")), "serve", "--base", "tiny-llama", "--store"]
    port = free_port()
    server = subprocess.Popen(
        # on the CPU, where the float32 reference runs: a GPU host's default would compare across devices
        [*cli, str(store.root), "--port", str(port), "--dtype", "float32", "--device", "cpu"],
        text=True,
        preexec_fn=interruptible_with_core_dumps,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = {"prompt": "hello", "user": "bob", "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=header("bob"), timeout=60)
        expected = reference(base, store, "hello", "bob", SamplingParams(max_new_tokens=6))
        assert reply.status_code == 200, reply.text  # the server's own words, should it ever fail here
        assert reply.json()["choices"][0]["text"] == base.tokenizer.decode(expected)
        # a crash writes no core file: its memory holds decrypted prefixes
        assert psutil.Process(server.pid).rlimit(psutil.RLIMIT_CORE)[0] == 0

        taken = subprocess.run(
            [*cli, str(store.root), "--port", str(port)], capture_output=True, text=True, timeout=120
        )
        assert taken.returncode == 1 and f"could not listen on 127.0.0.1:{port}" in taken.stderr
        assert taken.stderr.count("\n") == 1, taken.stderr  # refused before the base loads: no server log
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()  # never leave a server behind, even when the test fails
            server.wait()
            raise
    assert code == 0, "Ctrl-C must stop the server cleanly"


def test_the_engines_text_reaches_the_event_loop_in_order_with_one_wake_up_per_burst():
    async def run():
        handoff = LoopHandoff(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(3)]
        listeners = [handoff.listener(q) for q in queues]
        wakeups = []
        deliver = handoff._deliver
        handoff._deliver = lambda: (wakeups.append(1), deliver())

        def engine_step(first: int) -> None:  # as the engine thread does: a piece per row
            for i in range(first, first + 100):
                listeners[i % 3](i)

        for first in (0, 100):  # the loop blocked while a step runs: its pieces wait, then go at once
            worker = threading.Thread(target=engine_step, args=(first,))
            worker.start()
            worker.join()
            await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        return got, len(wakeups)

    got, wakeups = asyncio.run(run())
    assert got == [[i for i in range(200) if i % 3 == r] for r in range(3)]
    assert wakeups == 2


def test_a_server_on_loopback_refuses_a_rebound_host_name_in_openais_shape(served):  # noqa: F811
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sent requests with its own
    Host name, used the base and spent a user's wrong-key budget; Swagger's CDN page is gone."""
    base, store = served
    app = create_app(Engine(base, store=store), "m", allowed_hosts=allowed_hosts("127.0.0.1"))
    with TestClient(app) as test_client:
        body = {"prompt": "hi", "user": "alice", "max_tokens": 2}
        refused = test_client.post("/v1/completions", json=body, headers={**header("alice"), "host": "evil.example"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_host"
        metrics = test_client.get("/metrics", headers={"host": "127.0.0.1:8000"}).text
        assert 'fedprefix_requests_total{endpoint="/v1/completions",status="400"} 1.0' in metrics
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert test_client.get(path, headers={"host": "localhost"}).status_code == 404, path


def test_every_answer_names_its_request(client, monkeypatch):
    """X-Request-Id: the client's own carried back (a proxy's trace id), else a fresh one; errors
    too; the engine's generations carry it, so that its log names the request of a failed row."""
    from fedprefix.coordinator.serving import server

    queued, submit = [], server._submit_single_threaded
    monkeypatch.setattr(
        server, "_submit_single_threaded", lambda e, g, ls: queued.extend(x.request_id for x in g) or submit(e, g, ls)
    )
    body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    echoed = client.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "trace-42" and queued == ["trace-42"]
    fresh = [client.post("/v1/completions", json=body).headers["x-request-id"] for _ in range(2)]
    assert fresh[0] != fresh[1] and all(re.fullmatch("[0-9a-f]{32}", rid) for rid in fresh)
    for unusable in ("two words", "x" * 129):  # not echoed into a header or a log as it is
        assert client.get("/health", headers={"X-Request-Id": unusable}).headers["x-request-id"] != unusable
    assert client.get("/nowhere", headers={"X-Request-Id": "t-1"}).headers["x-request-id"] == "t-1"
    too_large = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"X-Request-Id": "t-2"})
    assert too_large.status_code == 413 and too_large.headers["x-request-id"] == "t-2"


def test_a_bug_is_a_500_in_openais_shape_naming_its_request(client, monkeypatch):
    """Starlette answers an unhandled error outside every middleware: no request id, plain text."""
    from fedprefix.coordinator.serving import server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server, "_params_of", broken)
    failing = TestClient(client.app, raise_server_exceptions=False)
    body = {"prompt": "hi", "max_tokens": 1}
    answer = failing.post("/v1/completions", json=body, headers={"X-Request-Id": "t-500"})
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "t-500"
    assert answer.json()["error"] == {
        "message": "the server failed (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
