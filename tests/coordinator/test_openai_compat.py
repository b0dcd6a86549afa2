"""The HTTP API against unusual but legal OpenAI requests: every answer in OpenAI's shape, never a
silent change of meaning, and the server serving on afterwards."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from fedprefix.coordinator.serving import Engine
from fedprefix.coordinator.serving import batch as batch_module
from fedprefix.coordinator.serving.limits import ServingLimits
from fedprefix.coordinator.serving.server import create_app

from tests.coordinator.test_engine import served  # noqa: F401  (fixture)
from tests.coordinator.test_server import header

PLAIN = {"prompt": "hello there", "user": "alice", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    base, store = served
    limits = ServingLimits(max_body_bytes=4096, max_messages=4)
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "tiny-llama", limits)) as test_client:
        yield test_client


def completion(client, **changes):
    return client.post("/v1/completions", json={**PLAIN, **changes}, headers=header("alice"))


def text_of(reply) -> str:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def stream_events(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}, headers=header("alice")) as reply:
        assert reply.status_code == 200
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_lone_surrogate_is_400_naming_the_field_and_the_server_serves_on(client):
    before = text_of(completion(client))
    raw = '{"prompt": "ab\\ud800cd", "max_tokens": 2}'  # valid JSON, not valid Unicode
    reply = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"].startswith("body.prompt")
    assert "surrogate" in reply.json()["error"]["message"]
    chat = '{"messages": [{"role": "user", "content": "x\\ud83d"}], "max_tokens": 2}'
    reply = client.post("/v1/chat/completions", content=chat, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "messages" in reply.json()["error"]["fields"][0]["field"]
    assert text_of(completion(client)) == before


def test_a_temperature_or_top_p_too_small_to_sample_with_is_served(client):
    greedy = text_of(completion(client))
    assert text_of(completion(client, temperature=1e-40)) == greedy
    assert text_of(completion(client, temperature=1.0, top_p=5e-324, seed=1)) == greedy
    for field, value in (("temperature", float("nan")), ("top_p", float("inf"))):
        raw = json.dumps({**PLAIN, field: value})  # NaN / Infinity: what Python's json writes
        reply = client.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json", **header("alice")}
        )
        assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"] == f"body.{field}"


def test_a_stream_that_fails_midway_ends_with_an_error_event(client, monkeypatch):
    real, calls = batch_module.take_token, [0]

    def failing(row, token, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("decoder broke")
        return real(row, token, *args)

    monkeypatch.setattr(batch_module, "take_token", failing)
    events = stream_events(client, "/v1/completions", PLAIN)
    assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
    assert "decoder broke" in events[-1]["error"]["message"]
    assert all(event["choices"][0]["finish_reason"] is None for event in events[:-1])  # no claim of success


def test_openai_fields_this_server_does_not_implement_are_refused_not_ignored(client):
    refused = [
        ("n", 2), ("best_of", 3), ("logprobs", 1), ("echo", True), ("suffix", "end"), ("logit_bias", {"1": 5}),
    ]  # fmt: skip
    for field, value in refused:
        reply = completion(client, **{field: value})
        assert reply.status_code == 400, (field, reply.text)
        assert reply.json()["error"]["fields"][0]["field"] == f"body.{field}"
    chat = {"messages": [{"role": "user", "content": "hi"}], "user": "alice", "max_tokens": 4}
    for field, value in (
        ("logprobs", True),
        ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}),
    ):
        reply = client.post("/v1/chat/completions", json={**chat, field: value}, headers=header("alice"))
        assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"] == f"body.{field}"
    defaults = {"n": 1, "logprobs": None, "echo": False, "frequency_penalty": 0, "logit_bias": {}, "best_of": 1}
    assert text_of(completion(client, **defaults)) == text_of(completion(client))
    chat_defaults = {"logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
    assert (
        client.post("/v1/chat/completions", json={**chat, **chat_defaults}, headers=header("alice")).status_code == 200
    )


def test_stream_options_include_usage_sends_a_last_usage_chunk(client):
    plain = completion(client).json()
    events = stream_events(client, "/v1/completions", {**PLAIN, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    # greedy, so the stream's usage must equal the plain answer's (a sampled row may stop early at EOS)
    chat = {"messages": [{"role": "user", "content": "hi"}], "user": "alice", "max_tokens": 4, "temperature": 0}
    plain_chat = client.post("/v1/chat/completions", json=chat, headers=header("alice")).json()
    events = stream_events(client, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain_chat["usage"]
    assert plain_chat["usage"]["completion_tokens"] > 0
    assert "usage" not in stream_events(client, "/v1/completions", PLAIN)[-1]
    reply = completion(client, stream_options={"include_usage": True})  # not streaming
    assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"] == "body.stream_options"


def test_token_id_prompts_equal_their_text(client, served):  # noqa: F811
    base, _ = served
    ids = base.tokenizer(PLAIN["prompt"], add_special_tokens=False).input_ids
    assert text_of(completion(client, prompt=ids)) == text_of(completion(client))
    two = completion(client, prompt=[ids, ids[:2]]).json()
    assert [c["text"] for c in two["choices"]][0] == text_of(completion(client))
    assert two["usage"]["prompt_tokens"] == len(ids) + 2
    for bad in ([[]], [ids, []], [10**9], ["1", 2], [True, False], [[1, "2"]]):
        reply = completion(client, prompt=bad)
        error = reply.json()["error"]
        assert reply.status_code == 400 and (error.get("param") or error["fields"][0]["field"]).removeprefix(
            "body."
        ).startswith("prompt"), (bad, reply.text)
    assert completion(client, max_tokens=None).json()["usage"]["completion_tokens"] == 16  # OpenAI's default


def test_chat_content_parts_and_the_developer_role(client):
    def chat(messages):
        body = {"messages": messages, "user": "alice", "max_tokens": 5, "temperature": 0}
        return client.post("/v1/chat/completions", json=body, headers=header("alice"))

    plain = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi\nthere"}])
    parts = chat(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
        ]
    )
    assert plain.status_code == parts.status_code == 200
    assert parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    for refused in ([{"role": "user", "content": image}], [{"role": "tool", "content": "1"}]):
        reply = chat(refused)
        assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"].startswith("body.messages.0")


def test_framework_errors_have_openai_shape_and_are_counted(client):
    for method, path, status in (("get", "/v1/nowhere", 404), ("get", "/v1/completions", 405)):
        reply = getattr(client, method)(path)
        assert reply.status_code == status and reply.json()["error"]["type"] == "invalid_request_error"
    broken = client.post("/v1/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "bad_request"
    assert client.post("/v1/completions", content=b"x" * 5000).status_code == 413
    metrics = client.get("/metrics").text
    assert 'fedprefix_requests_total{endpoint="other",status="404"}' in metrics  # not one label per path
    assert 'endpoint="/v1/completions",status="405"' in metrics
    assert 'endpoint="/v1/completions",status="413"' in metrics and "/v1/nowhere" not in metrics


def test_a_chat_too_long_for_the_context_names_messages_not_a_max_tokens_it_never_sent(client):
    body = {"messages": [{"role": "user", "content": "y " * 600}], "user": "alice"}  # context: 512
    reply = client.post("/v1/chat/completions", json=body, headers=header("alice"))
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "messages"
    assert "leave no room for a reply" in error["message"] and "max_tokens" not in error["message"]
    assert error["message"].startswith("messages: ")  # the field it sent, not the prompt made of it


def test_a_chat_of_more_turns_than_the_cap_is_refused_before_its_template_runs(client, monkeypatch):
    from fedprefix.coordinator.serving import server

    templated = []
    monkeypatch.setattr(server, "chat_prompt", lambda *args: templated.append(1) or "x")
    turns = [{"role": "user", "content": "hi"}] * 5
    reply = client.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert "5 messages, at most 4" in reply.json()["error"]["message"] and templated == []


def test_a_model_this_server_does_not_serve_is_404_not_another_models_answer(client):
    for path, body in (
        ("/v1/completions", PLAIN),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": "alice"}),
    ):
        wrong = client.post(path, json={**body, "model": "tiny-lama"}, headers=header("alice"))
        assert wrong.status_code == 404, wrong.text
        error = wrong.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and "'tiny-llama'" in error["message"]
        right = client.post(path, json={**body, "model": "tiny-llama", "max_tokens": 2}, headers=header("alice"))
        assert right.status_code == 200 and right.json()["model"] == "tiny-llama"
    assert completion(client).status_code == 200  # no model: the served one
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
    assert 'endpoint="/v1/chat/completions",status="404"' in client.get("/metrics").text


def test_a_completion_without_max_tokens_is_fitted_to_the_context_left(client):
    """OpenAI's default of 16 is not the client's choice: with 5 tokens of room it gets 5, where
    it was refused naming a max_tokens the client never sent; an explicit 16 is still refused."""
    prompt = [7] * (512 - 2 - 5)  # alice's prefix: 2 tokens; the context: 512
    fitted = client.post(
        "/v1/completions", json={**PLAIN, "prompt": prompt, "max_tokens": None}, headers=header("alice")
    )
    assert fitted.status_code == 200, fitted.text
    assert fitted.json()["usage"]["completion_tokens"] <= 5
    body = {key: value for key, value in PLAIN.items() if key != "max_tokens"}
    assert client.post("/v1/completions", json={**body, "prompt": prompt}, headers=header("alice")).status_code == 200
    refused = completion(client, prompt=prompt, max_tokens=16)
    assert refused.status_code == 400 and "max_tokens" in refused.json()["error"]["message"]


def test_presence_and_frequency_penalties_are_honoured_within_openais_range(client):
    for field in ("presence_penalty", "frequency_penalty"):
        for value in (2.5, -3, "1"):
            reply = completion(client, **{field: value})
            assert reply.status_code == 400 and reply.json()["error"]["fields"][0]["field"] == f"body.{field}", value
        assert completion(client, **{field: None}).status_code == 200  # the openai client's explicit None
    plain = text_of(completion(client, max_tokens=16))
    penalized = completion(client, max_tokens=16, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalized.status_code == 200 and text_of(penalized) != plain


def test_vllms_extensions_and_openais_audio_are_refused_not_ignored(client):
    """A client moving from vLLM got free text for a guided choice, a reply past a stop token id,
    random text for top_k=1 and a closed turn for continue_final_message (an auditor's finding)."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "user": "alice", "max_tokens": 4}
    refused = [
        ("guided_choice", ["zebra"]), ("structured_outputs", {"choice": ["zebra"]}), ("stop_token_ids", [28]),
        ("top_k", 1), ("min_p", 0.1), ("min_tokens", 3), ("repetition_penalty", 1.2), ("ignore_eos", True),
        ("include_stop_str_in_output", True), ("continue_final_message", True), ("add_generation_prompt", False),
        ("chat_template_kwargs", {"enable_thinking": True}), ("modalities", ["text", "audio"]), ("audio", {}),
    ]  # fmt: skip
    for field, value in refused:
        reply = client.post("/v1/chat/completions", json={**chat, field: value}, headers=header("alice"))
        assert reply.status_code == 400, (field, reply.text)
        assert reply.json()["error"]["param"] == field, reply.text
    off = {"top_k": -1, "min_p": 0, "repetition_penalty": 1.0, "ignore_eos": False, "stop_token_ids": []}
    assert text_of(completion(client, **off)) == text_of(completion(client))


def test_openai_clients_get_bad_request_errors_naming_the_param_and_one_model_by_id(client):
    """422 was no BadRequestError to the openai client, and its `param` was None; `models.retrieve`
    got 404; a chat choice had no `logprobs`; `user: ""` (OpenAI: not set) was refused."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="-", http_client=client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="tiny-llama", prompt="hi", n=2, max_tokens=2)
    assert caught.value.param == "n" and caught.value.code == "invalid_body"
    assert api.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "user": ""}
    reply = client.post("/v1/chat/completions", json=chat)  # the base alone, as without `user`
    assert reply.status_code == 200 and reply.json()["choices"][0]["logprobs"] is None
    missing = client.post("/v1/completions", json={"max_tokens": 2})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
