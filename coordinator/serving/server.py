"""OpenAI-compatible HTTP API over the batching engine (FastAPI).

    POST /v1/completions        POST /v1/chat/completions     (stream: true -> server-sent events)
    GET  /v1/models             GET  /health                  GET /metrics (Prometheus text)

The body's `user` names whose prefix to use; that user's key comes in the header
`X-Prefix-Key`: base64 of 32 raw bytes, `b64:` + base64 of a UTF-8 passphrase (any
Unicode, from any client), or else the passphrase itself (api.parse_key). Without `user`
the base runs with no prefix. Errors have OpenAI's shape, `{"error": {"message", "type",
"code"}}`: bad key header 400, missing key 401, wrong key 403, unknown user 404, body
too large 413, malformed body, a cap passed, an OpenAI option not implemented here 400
(with the fields named), prompt + max_tokens past the context 400 context_length_exceeded, overload or unlock
throttling 429 (with Retry-After); an unreadable body 400, an unknown path 404, a wrong
method 405.

Every field is checked before anything is queued (caps: limits.py); a failed row never
affects its batch mates; a client that goes away (stream or not) cancels its prompts,
which leave the batch before the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Collection

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fedprefix.common.chat import chat_prompt
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import SamplingParams
from fedprefix.common.http_guards import HostCheck
from fedprefix.common.precision import dtype_name
from fedprefix.common.store import StoreError
from starlette.concurrency import run_in_threadpool

from .api import KEY_HEADER, ApiError, ChatBody, CompletionBody, parse_key, short, store_error
from .engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
)
from .handoff import LoopHandoff
from .http_errors import answer_errors, count_answer, engine_error
from .limits import BodySizeLimit, ServingLimits, bad_host_answer, check_request, error_body
from .metrics import Metrics
from .request_ids import RequestIds, request_id

log = logging.getLogger(__name__)
router = APIRouter()


def create_app(
    engine: Engine, model_name: str, limits: ServingLimits | None = None, allowed_hosts: Collection[str] | None = None
) -> FastAPI:
    """The HTTP app around a running engine (started, or run() on another thread); `allowed_hosts`:
    the Host names it answers (None: any; common.http_guards.allowed_hosts)."""
    # no /docs: Swagger's page loads unpinned scripts from a CDN into the API's own origin
    app = FastAPI(title="fedprefix serving", description=__doc__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.model_name = engine, Metrics(engine), model_name
    app.state.limits = limits = limits or ServingLimits()
    app.state.paths = frozenset(route.path for route in router.routes)  # what count_answer labels by

    def bad_host(scope, message: str) -> JSONResponse:
        count_answer(scope, 400)
        return bad_host_answer(message)

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, refused=count_answer)
    app.add_middleware(HostCheck, allowed=allowed_hosts, refuse=bad_host)  # before any body is read
    app.add_middleware(RequestIds)  # outside the others: their answers name the request too
    answer_errors(app)
    app.include_router(router)
    return app


def _submit_single_threaded(engine: Engine, generations, listeners):
    """Engine.submit_many on a server worker thread, its torch work (a prefix's dtype
    conversion) kept to one thread: a live thread owning an OpenMP pool of its own makes
    every parallel operation of the engine wait for a wake-up (see Engine.run)."""
    torch.set_num_threads(1)
    return engine.submit_many(generations, listeners)


# ------------------------------------------------------------------ one request through the engine


async def _submit(
    request: Request,
    prompts: list[str | list[int]],
    params: SamplingParams,
    user: str | None,
    stream: bool,
    fit=False,
    prompt_field="prompt",
    templated=False,
):
    """Queue all prompts of one HTTP request together (all or none); (handle, events) per prompt.

    `stream`: the events are the text pieces, then None; otherwise only the None that ends
    each prompt (a wake-up per piece would resume the whole ASGI stack for nothing).
    `fit`: max_tokens was not given, so lower it to what the context leaves instead of refusing.
    `prompt_field`: the body field the prompt came from, named in errors.
    `templated`: the prompt is a chat template's text (its own special tokens, no BOS added)."""
    engine: Engine = request.app.state.engine
    broken = check_request(request.app.state.limits, len(prompts), params.stop)
    if broken is not None:
        field, message = broken
        raise ApiError(400, f"{field}: {message}", "limit_exceeded", field=field)
    keys = request.headers.getlist(KEY_HEADER)
    if len(keys) > 1:  # which one to try is a guess, and a wrong guess counts against the user
        raise ApiError(400, f"{len(keys)} {KEY_HEADER} headers; send one", "bad_key_header")
    key = parse_key(keys[0] if keys else None)
    if user is None and key is not None:  # not silently the base model for a client that meant a user
        message = f"an {KEY_HEADER} header came without `user`: name the user whose prefix it opens"
        raise ApiError(400, message, "missing_user", field="user")
    if user is not None and key is None:
        raise ApiError(
            401, f"user {user!r} needs the {KEY_HEADER} header (base64 of 32 bytes, or a passphrase)", "missing_key"
        )
    handoff = _handoff(request.app)
    queues = [asyncio.Queue() for _ in prompts]
    rid = request_id(request.scope)
    generations = [
        GenerationRequest(p, user, key, params, fit_context=fit, templated=templated, request_id=rid) for p in prompts
    ]
    listeners = [handoff.listener(q, pieces=stream) for q in queues]  # called on the engine thread
    try:  # a passphrase may cost a key derivation: keep it off the event loop
        handles = await run_in_threadpool(_submit_single_threaded, engine, generations, listeners)
    except StoreError as exc:
        raise store_error(exc) from exc
    except FedPrefixError as exc:
        error = engine_error(exc)
        if error.field == "prompt":  # a chat's prompt is its messages
            error.field, error.message = prompt_field, f"{prompt_field}: {str(exc).removeprefix('prompt: ')}"
        raise error from exc
    except Exception as exc:  # a bug, not the client's fault: still an answer in OpenAI's shape
        log.exception("could not queue request %s", rid)
        raise ApiError(500, f"could not queue the request: {type(exc).__name__}", "internal_error") from exc
    return list(zip(handles, queues, strict=True))


def _handoff(app: FastAPI) -> LoopHandoff:
    """The app's hand-off from the engine thread to the event loop serving it (one per loop)."""
    loop = asyncio.get_running_loop()
    handoff = getattr(app.state, "handoff", None)
    if handoff is None or handoff.loop is not loop:
        handoff = app.state.handoff = LoopHandoff(loop)
    return handoff


def _watch(request: Request, submitted) -> asyncio.Task:
    """A task that cancels the request's prompts once its client disconnects (cancel it when done)."""

    async def watch() -> None:
        # The body is read: the next ASGI message is http.disconnect, when the client goes away
        # (or once the response is complete, by which time this task is cancelled). No polling.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for handle, _ in submitted:
            handle.cancel()

    return asyncio.ensure_future(watch())


async def _collect_all(request: Request, submitted) -> list[GenerationResult]:
    """Every prompt's result; if the client goes away or one prompt fails, the others are cancelled."""
    watcher = _watch(request, submitted)
    try:
        results = []
        for handle, events in submitted:
            while await events.get() is not None:
                pass
            try:
                results.append(handle.result(timeout=0))
            except FedPrefixError as exc:
                raise engine_error(exc) from exc
        return results
    finally:
        watcher.cancel()
        for handle, _ in submitted:
            handle.cancel()  # nothing for a finished one


def _params_of(body, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(request: Request, chunks, submitted) -> StreamingResponse:
    """Server-sent events of `chunks`; the generation is cancelled when the client goes away."""

    async def body():
        watcher = _watch(request, submitted)
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation by the server when the client disconnected
            watcher.cancel()
            for handle, _ in submitted:
                handle.cancel()

    return StreamingResponse(body(), media_type="text/event-stream")


def _ok(request: Request) -> None:
    count_answer(request.scope, 200)


def _stream_end(handle, head: dict, usage: bool) -> list[dict]:
    """What a stream sends after its last piece: an error event where generation failed (as
    vLLM does: the status line said 200 long ago), and the usage chunk if it was asked for."""
    try:
        result = handle.result(timeout=0)
    except FedPrefixError as exc:
        error = engine_error(exc)
        return [error_body(error.status, error.message, error.code)]
    return [{**head, "choices": [], "usage": _usage([result])}] if usage else []


# ------------------------------------------------------------------ routes


def _check_model(request: Request, model: str | None) -> None:
    """404 for a `model` this server does not serve (as OpenAI and vLLM answer): a typo must not
    get another model's answer. Absent: the served one. A user's prefix is chosen by `user`."""
    served = request.app.state.model_name
    if model is not None and model != served:
        message = f"model {short(model)} is not served here; this server serves {served!r} (GET /v1/models)"
        raise ApiError(404, message, "model_not_found", field="model")


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    _check_model(request, body.model)
    prompts = body.prompts()
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt: give at least one prompt, none empty", "invalid_body", field="prompt")
    if body.stream and len(prompts) != 1:  # checked before anything is queued
        raise ApiError(400, "stream: streaming takes a single prompt", "invalid_body", field="stream")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    fit = body.max_tokens is None  # a default the client did not choose: lowered to fit, not refused
    submitted = await _submit(request, prompts, _params_of(body, max_tokens), body.user, body.stream, fit=fit)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": request.app.state.model_name}
    if body.stream:
        handle, events = submitted[0]
        usage = body.include_usage

        async def chunks():
            while (delta := await events.get()) is not None:
                yield {**head, "choices": [{"text": delta, "index": 0, "logprobs": None, "finish_reason": None}]}
            if handle.finish_reason != "error":
                finish = handle.finish_reason
                yield {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}]}
            for chunk in _stream_end(handle, head, usage):
                yield chunk

        _ok(request)
        return _sse(request, chunks(), submitted)
    results = await _collect_all(request, submitted)
    _ok(request)
    choices = [
        {"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason} for i, r in enumerate(results)
    ]
    return {**head, "choices": choices, "usage": _usage(results)}


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request):
    _check_model(request, body.model)
    most = request.app.state.limits.max_messages
    if len(body.messages) > most:  # before the chat template, which runs here on the event loop
        message = f"messages: {len(body.messages)} messages, at most {most} (send the conversation's recent turns)"
        raise ApiError(400, message, "limit_exceeded", field="messages")
    try:
        prompt = chat_prompt(request.app.state.engine.tokenizer, [message.turn() for message in body.messages])
    except Exception as exc:  # the chat template refused these turns (an order it does not allow)
        message = f"messages: the chat template refused them: {exc}"
        raise ApiError(400, message, "invalid_body", field="messages") from exc
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _params_of(body, max_tokens or 256)
    submitted = await _submit(
        request,
        [prompt],
        params,
        body.user,
        body.stream,
        fit=max_tokens is None,
        prompt_field="messages",
        templated=True,
    )
    ((handle, events),) = submitted
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "created": created, "model": request.app.state.model_name}
    if body.stream:
        usage = body.include_usage

        async def chunks():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield {
                **chunk,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
            while (delta := await events.get()) is not None:
                yield {**chunk, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
            if handle.finish_reason != "error":
                yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": handle.finish_reason}]}
            for end in _stream_end(handle, chunk, usage):
                yield end

        _ok(request)
        return _sse(request, chunks(), submitted)
    (result,) = await _collect_all(request, submitted)
    _ok(request)
    message = {"role": "assistant", "content": result.text}
    return {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": _usage([result]),
    }


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fedprefix"}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state.model_name)]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    """One model (the openai client's models.retrieve)."""
    _check_model(request, model)
    return _model_card(model)


@router.get("/health")
async def health(request: Request):
    """200 once the engine runs; 503 before (the HTTP thread listens first) and after it stops."""
    engine: Engine = request.app.state.engine
    running = engine.running  # read once: the status and the code agree
    body = {
        "status": "ok" if running else "not running",
        "model": request.app.state.model_name,
        "dtype": dtype_name(engine.base.dtype),
        "device": str(engine.base.device),
        "cuda_graphs": engine.cuda_graphs,  # None on a CPU
        "queue_depth": engine.queue_depth,
        "running": engine.batch_size,  # decoding or still prefilling
    }
    return JSONResponse(body, status_code=200 if running else 503)


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
