"""Malformed bodies get a short 400 that names the fault, at once: never one error per bad item
(a 1 MiB body holds a million), never a value of the wrong JSON type read as another."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.api import KEY_HEADER, MAX_FIELD_ERRORS, ChatBody, CompletionBody
from fedprefix.coordinator.serving.replica_router import _user_of
from fedprefix.coordinator.serving.requests import InvalidRequest
from fedprefix.coordinator.serving.server import create_app
from pydantic import ValidationError

from tests.coordinator.test_engine import served  # noqa: F401  (fixture)
from tests.coordinator.test_server import header

PLAIN = {"prompt": "hello there", "user": "alice", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "tiny-llama")) as test_client:
        yield test_client


def refused(client, body=None, content=None, headers=None) -> dict:
    reply = client.post("/v1/completions", json=body, content=content, headers={**header("alice"), **(headers or {})})
    assert reply.status_code == 400, reply.text
    return reply.json()["error"]


def test_a_million_bad_items_cost_one_error_each_branch():
    started = time.perf_counter()
    with pytest.raises(ValidationError) as caught:
        CompletionBody.model_validate({"prompt": [{}] * 300_000})
    assert caught.value.error_count() <= 4  # one per branch of the prompt's union, not 4 per item
    with pytest.raises(ValidationError) as caught:
        ChatBody.model_validate({"messages": [{}] * 300_000})
    assert caught.value.error_count() <= 2
    assert time.perf_counter() - started < 5  # was ~10 s and ~1.6 GB for the error list alone


def test_a_body_of_many_bad_items_gets_a_short_answer_naming_the_first(client):
    body = json.dumps({**PLAIN, "prompt": [{}] * 100_000, "stop": [1] * 50_000})  # ~550 KB
    reply = client.post(
        "/v1/completions", content=body, headers={**header("alice"), "content-type": "application/json"}
    )
    assert reply.status_code == 400 and len(reply.content) < 2000, len(reply.content)
    fields = reply.json()["error"]["fields"]
    assert len(fields) <= MAX_FIELD_ERRORS + 1
    assert {f["field"] for f in fields} == {"body.prompt.0", "body.stop.0"}
    assert client.post("/v1/completions", json=PLAIN, headers=header("alice")).status_code == 200


def test_a_union_field_of_the_wrong_type_is_one_entry_naming_what_fits(client):
    error = refused(client, {**PLAIN, "prompt": None})
    assert error["fields"] == [{"field": "body.prompt", "message": "Input should be a valid string or a valid list"}]
    assert refused(client, {**PLAIN, "prompt": ["a", 1]})["fields"] == [  # texts: the branch that got furthest
        {"field": "body.prompt.1", "message": "Input should be a valid string"}
    ]
    assert refused(client, {**PLAIN, "prompt": [[1, "x"]]})["fields"] == [
        {"field": "body.prompt.0.1", "message": "Input should be a valid integer"}
    ]
    error = refused(client, {**PLAIN, "prompt": [{}]})  # every list branch reached the item: each says what fits
    assert error["fields"] == [
        {"field": "body.prompt.0", "message": "Input should be a valid string or a valid integer or a valid list"}
    ]
    surrogate = json.dumps({**PLAIN, "prompt": "a\ud800"})  # valid JSON, not valid Unicode
    error = refused(client, content=surrogate, headers={"content-type": "application/json"})
    # the string branch's own reason, not the list branches' "a valid list"
    assert len(error["fields"]) == 1 and "surrogate" in error["fields"][0]["message"]


def test_json_errors_and_a_form_body_say_what_is_wrong(client):
    error = refused(client, content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
    assert error["fields"][0]["field"] == "body" and error["message"].startswith("body: not valid JSON at character")
    error = refused(client, content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in error["message"] and "x-www-form-urlencoded" in error["message"]
    error = refused(client, content=json.dumps(PLAIN).encode(), headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "3"), ("max_tokens", True), ("seed", True), ("seed", "1"), ("stream", "yes"), ("stream", 1),
     ("temperature", "1"), ("temperature", True), ("top_p", "0.5")],
)  # fmt: skip
def test_a_value_of_another_json_type_is_refused_not_converted(client, field, value):
    error = refused(client, {**PLAIN, field: value})
    assert error["fields"][0]["field"] == f"body.{field}", error


def test_numbers_of_either_json_kind_are_still_numbers(client):
    reply = client.post("/v1/completions", json={**PLAIN, "temperature": 0, "top_p": 1}, headers=header("alice"))
    assert reply.status_code == 200  # OpenAI's temperature 1 (an integer) is a number


def test_the_user_field_is_named_for_a_bad_id_a_key_without_a_user_and_an_engine_without_a_store(client, served):  # noqa: F811
    error = refused(client, {**PLAIN, "user": "../x"})
    assert error["code"] == "bad_user_id" and error["param"] == "user"
    error = refused(client, {k: v for k, v in PLAIN.items() if k != "user"})  # alice's key, no user
    assert error["code"] == "missing_user" and error["param"] == "user"
    base, _ = served
    with Engine(base) as engine, pytest.raises(InvalidRequest) as caught:
        engine.submit(GenerationRequest(prompt="hi", user="alice", key=b"k" * 32))
    assert caught.value.field == "user"


def test_two_key_headers_are_refused_before_either_is_tried(client):
    two = [(KEY_HEADER, header("bob")[KEY_HEADER]), (KEY_HEADER, header("alice")[KEY_HEADER])]
    reply = client.post("/v1/completions", json=PLAIN, headers=two)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_key_header"
    assert client.post("/v1/completions", json=PLAIN, headers=header("alice")).status_code == 200  # no backoff


def test_the_replicas_router_reads_no_user_from_json_nested_too_deep():
    assert _user_of(b"[" * 100_000 + b"]" * 100_000) is None
    assert _user_of(b'{"user": "alice"}') == "alice"


def test_a_request_still_prefilling_counts_as_running(served):  # noqa: F811
    """/health and /metrics read batch_size: a burst of long prompts must not look like an idle server."""
    base, store = served
    pieces, seen = [], []
    with Engine(base, store=store, max_prefill_tokens=2) as engine:
        request = GenerationRequest(prompt="y " * 100, params=SamplingParams(max_new_tokens=1))
        handle = engine.submit(request, pieces.append)
        while not pieces:  # ~100 prefill steps of 2 tokens before the first token
            seen.append(engine.batch_size)
            time.sleep(0.002)  # leave the engine's thread the interpreter
        handle.result(timeout=60)
    assert seen.count(1) > 5, seen[-20:]


def test_an_error_never_echoes_a_large_value_back(client):
    for body in ({**PLAIN, "n": "x" * 100_000}, {**PLAIN, "tools": [{"type": "function"}] * 5000}):
        reply = client.post("/v1/completions", json=body, headers=header("alice"))
        assert reply.status_code == 400 and len(reply.content) < 2000, len(reply.content)
    reply = client.post("/v1/completions", json={**PLAIN, "model": "m" * 100_000}, headers=header("alice"))
    assert reply.status_code == 404 and len(reply.content) < 2000


def test_null_is_openais_default_for_temperature_top_p_and_stream(client):
    """The openai client sends null for an explicit None: OpenAI reads it as the default."""
    nulls = {**PLAIN, "temperature": None, "top_p": None, "stream": None, "seed": 1}
    reply = client.post("/v1/completions", json=nulls, headers=header("alice"))
    seeded = client.post("/v1/completions", json={**PLAIN, "temperature": 1.0, "seed": 1}, headers=header("alice"))
    assert reply.status_code == 200 and reply.json()["choices"] == seeded.json()["choices"]


def test_a_refused_stream_is_the_one_fault_named_not_its_options_too(client):
    error = refused(client, {**PLAIN, "stream": "true", "stream_options": {"include_usage": True}})
    assert [f["field"] for f in error["fields"]] == ["body.stream"]


def test_a_body_that_is_not_utf8_says_so(client):
    reply = client.post("/v1/completions", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not UTF-8" in reply.json()["error"]["message"]


def test_a_body_that_stops_coming_is_answered_408_and_never_reaches_the_app():
    """uvicorn has no body timeout: 100 sockets that sent half a body held their connections
    until the client left (an auditor's soak)."""
    import asyncio

    from fedprefix.coordinator.serving.limits import BodySizeLimit

    reached, refusals, sent = [], [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def run():
        first = True

        async def receive():
            nonlocal first
            if first:  # half a body, then nothing more
                first = False
                return {"type": "http.request", "body": b'{"prompt": "hi", ', "more_body": True}
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        guard = BodySizeLimit(app, max_bytes=1000, refused=lambda scope, status: refusals.append(status), timeout_s=0.2)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await asyncio.wait_for(guard(scope, receive, send), timeout=10)

    asyncio.run(run())
    assert not reached and refusals == [408]
    start, body = sent
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "body_timeout"
