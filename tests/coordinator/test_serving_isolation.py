"""One bad request or client hurts nobody else: validation, row failures, cancellation, fairness, caps."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.engine import EngineOverloaded, InvalidRequest, RequestCancelled
from fedprefix.coordinator.serving.limits import ServingLimits
from fedprefix.coordinator.serving.server import create_app

from tests.coordinator.test_engine import key_of, reference, request, served  # noqa: F401  (fixture)
from tests.coordinator.test_server import LoopbackServer, header


def slow_decode(engine: Engine, seconds: float = 0.02) -> None:
    """Make every engine step take `seconds`, so that a test can act between steps."""
    step = engine._forward.step

    def slow(*args):
        time.sleep(seconds)
        return step(*args)

    engine._forward.step = slow


def test_every_field_is_checked_before_anything_is_queued(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "m")) as client:
        cases = {
            "seed": {"seed": 2**64, "temperature": 1.0},
            "temperature": {"temperature": 2.5},
            "top_p": {"top_p": 0},
            "max_tokens": {"max_tokens": 5000},
        }
        for field, extra in cases.items():
            reply = client.post("/v1/completions", json={"prompt": "x", **extra})
            assert reply.status_code == 400, (field, reply.text)
            assert {f["field"] for f in reply.json()["error"]["fields"]} == {f"body.{field}"}
        assert client.post("/v1/completions", json={"prompt": "x", "seed": -(2**63) - 1}).status_code == 400
        negative = {"prompt": "x", "seed": -1, "max_tokens": 1}  # OpenAI's seed: any signed 64-bit integer
        assert client.post("/v1/completions", json=negative).status_code == 200
        long = client.post("/v1/completions", json={"prompt": "y" * 600, "max_tokens": 2})  # context: 512
        assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"
        # what OpenAI and vLLM answer, which clients catch to trim a chat's history
        assert long.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length" in long.json()["error"]["message"]
        assert "context of 512 tokens" in long.json()["error"]["message"]
        # fits the base alone, not behind bob's 5 prefix tokens
        tight = {"prompt": "y" * 500, "max_tokens": 10, "user": "bob"}
        reply = client.post("/v1/completions", json=tight, headers=header("bob"))
        assert reply.status_code == 400 and "5 prefix tokens" in reply.json()["error"]["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200  # default max_tokens fits
        assert engine.stats.finished == 2 and engine.queue_depth == 0  # the negative seed's and the chat


def test_a_prompt_longer_than_gpt2s_context_is_400_not_a_500_for_its_batch():
    base = load_base("tiny-gpt2")  # learned positions: past n_positions the forward itself fails
    with Engine(base) as engine, TestClient(create_app(engine, "tiny-gpt2")) as client:
        reply = client.post("/v1/completions", json={"prompt": "z" * 520, "max_tokens": 2})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
        assert client.post("/v1/completions", json={"prompt": "z", "max_tokens": 2}).status_code == 200


class Bomb(str):
    """A stop string whose handling raises, as a stand-in for any per-row failure."""

    def __len__(self):
        raise RuntimeError("boom")


def test_a_failing_row_fails_alone_and_its_batch_mates_finish(served, caplog):  # noqa: F811
    base, store = served
    good = [request("alice", "mate one", max_new_tokens=8), request(None, "mate two", max_new_tokens=8)]
    bad_seed = request("bob", "seeded", max_new_tokens=8, temperature=1.0)
    bad_seed.params = bad_seed.params.model_copy(update={"seed": 2**80})  # past the API's check and 64 bits
    bad_stop = GenerationRequest("stops", params=SamplingParams.model_construct(**{**SamplingParams().__dict__}))
    bad_stop.params.stop = [Bomb("x")]
    poisoned = request("carol", "POISON", max_new_tokens=8)
    bad_stop.request_id, poisoned.request_id = "r-stop", "r-poison"  # the engine's log names them
    with Engine(base, store=store) as engine:
        step = engine._forward.step
        poison = set(base.tokenizer("POISON", add_special_tokens=False).input_ids[:1])

        def failing_prefill(chunk, decode):
            if chunk is not None and any(t in poison for t in chunk.input_ids[:, -6:].flatten().tolist()):
                raise RuntimeError("forward failed")
            return step(chunk, decode)

        engine._forward.step = failing_prefill
        running = engine.submit(request("bob", "already running", max_new_tokens=30))
        handles = engine.submit_many([good[0], bad_seed, bad_stop, poisoned, good[1]])
        with pytest.raises(InvalidRequest, match="seed"):
            handles[1].result(timeout=60)
        for handle, match in ((handles[2], "boom"), (handles[3], "forward failed")):
            with pytest.raises(Exception, match=match):
                handle.result(timeout=60)
        results = [handles[0].result(timeout=60), handles[4].result(timeout=60), running.result(timeout=60)]
    logged = [record.getMessage() for record in caplog.records]
    assert "prefill failed (request r-poison)" in logged and "a row failed (request r-stop)" in logged, logged
    for (user, prompt, n), result in zip(
        [("alice", "mate one", 8), (None, "mate two", 8), ("bob", "already running", 30)], results, strict=True
    ):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=n))


def test_a_cancelled_request_leaves_the_batch_within_one_step(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine:
        slow_decode(engine)
        engine._batch.eos = set()  # never ends on its own
        failed_at, ended = [], threading.Event()  # the step count as the row ends, read on the engine's thread

        def listener(piece):
            if piece is None:
                failed_at.append(engine.stats.steps)
                ended.set()

        long = engine.submit(request("alice", "long", max_new_tokens=400), listener)
        mate = engine.submit(request("bob", "mate", max_new_tokens=20))
        waiting = engine.submit(request(None, "queued", max_new_tokens=5))
        waiting.cancel()
        while engine.stats.steps < 3:
            time.sleep(0.001)
        long.cancel()
        cancelled_at = engine.stats.steps
        with pytest.raises(RequestCancelled):
            long.result(timeout=10)
        assert ended.wait(10) and failed_at[0] - cancelled_at <= 1
        with pytest.raises(RequestCancelled):
            waiting.result(timeout=10)
        assert mate.result(timeout=60).tokens == reference(
            base, store, "mate", "bob", SamplingParams(max_new_tokens=20, ignore_eos=True)
        )


def test_a_client_that_goes_away_cancels_its_generation(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine:
        slow_decode(engine)
        engine._batch.eos = set()  # never ends on its own
        with LoopbackServer(create_app(engine, "m")) as url:
            body = {"prompt": "go", "max_tokens": 480, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
                next(reply.iter_lines())  # generation is under way; then the client closes
            for stream in (True, False):
                if not stream:
                    with pytest.raises(httpx.ReadTimeout):
                        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
                deadline = time.monotonic() + 5
                while engine.batch_size and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert engine.batch_size == 0 and engine.stats.tokens < 2 * 200
    assert engine.stats.finished == 0  # nothing ran to its 480 tokens


def test_one_user_with_many_prompts_cannot_starve_another(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store, max_batch_size=2, max_queue_per_user=8) as engine:
        slow_decode(engine, 0.005)
        engine._batch.eos = set()  # never ends on its own
        with pytest.raises(EngineOverloaded, match="anonymous requests already have 0 of 8"):
            engine.submit_many([request(None, f"flood {i}") for i in range(9)])
        flood = engine.submit_many([request(None, f"flood {i}", max_new_tokens=20) for i in range(8)])
        bob = engine.submit(request("bob", "mine", max_new_tokens=3))  # another user still gets in
        bob.result(timeout=60)
        assert sum(h.done for h in flood) <= 2, "bob joined at the first free slot, before the rest of the flood"
        for handle in flood:
            handle.result(timeout=60)


def test_per_request_caps_and_body_size(served):  # noqa: F811
    base, store = served
    limits = ServingLimits(max_prompts=2, max_stops=2, max_stop_chars=4, max_body_bytes=2000)
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "m", limits)) as client:
        for extra, field in (
            ({"prompt": ["a", "b", "c"]}, "prompt"),
            ({"stop": ["a", "b", "c"]}, "stop"),
            ({"stop": "abcde"}, "stop"),
        ):
            reply = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
        big = client.post("/v1/completions", json={"prompt": "x" * 3000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        chunked = client.post(
            "/v1/completions", content=iter([b'{"prompt": "', b"x" * 3000, b'"}']), headers={"content-type": "json"}
        )
        assert chunked.status_code == 413
        ok = client.post("/v1/completions", json={"prompt": ["a", "b"], "stop": ["ab", "c"], "max_tokens": 2})
        assert ok.status_code == 200
        assert engine.stats.finished == 2
