"""Every error the serving API answers: OpenAI's shape, counted in /metrics (count_answer, which
counts every other answer too), and the answer to each engine error."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fedprefix.common.errors import FedPrefixError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from .api import ApiError, field_errors
from .limits import error_body
from .request_ids import HEADER as REQUEST_ID_HEADER
from .request_ids import request_id
from .requests import EngineOverloaded, EngineStopped, InvalidRequest, RequestCancelled
from .unlock import UnlockThrottled

log = logging.getLogger(__name__)


def answer_errors(app: FastAPI) -> None:
    """Answer every error of `app` so."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)  # unknown path, wrong method, unreadable body
    app.add_exception_handler(Exception, _unexpected)  # answered outside every middleware: see there


def count_answer(scope: Scope, status: int | str) -> None:
    """Count an answer in /metrics by the path of the route its request reached (or would reach:
    the body limit refuses before routing), or "other" (a path nobody serves must not add a label)."""
    state = scope["app"].state  # Starlette sets the app before any middleware runs
    route = getattr(scope.get("route"), "path", None)
    path = route or (scope.get("path") if scope.get("path") in state.paths else "other")
    state.metrics.requests.labels(path, str(status)).inc()


def engine_error(exc: FedPrefixError) -> ApiError:
    """The HTTP answer to an engine error, before or during generation."""
    if isinstance(exc, UnlockThrottled):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return ApiError(429, str(exc), "unlock_throttled", {"Retry-After": retry})
    if isinstance(exc, EngineOverloaded):
        return ApiError(429, str(exc), "overloaded", {"Retry-After": "1"})
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), exc.code, field=exc.field)
    if isinstance(exc, RequestCancelled):
        return ApiError(499, str(exc), "cancelled")  # nobody is listening any more
    if isinstance(exc, EngineStopped):  # still starting, or stopping: another try (or replica) may answer
        return ApiError(503, str(exc), "engine_not_running", {"Retry-After": "1"})
    return ApiError(500, str(exc), "generation_failed")


async def _api_error(request: Request, exc: ApiError):
    count_answer(request.scope, exc.status)
    return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.field), exc.status, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception):
    """A bug's 500, in OpenAI's shape: Starlette answers it outside the middlewares, so it names
    the request itself (RequestIds gave it an id on the way in) and counts itself."""
    rid = request_id(request.scope)
    log.error("request %s failed", rid, exc_info=exc)
    count_answer(request.scope, 500)
    body = error_body(500, f"the server failed ({type(exc).__name__})", "internal_error")
    return JSONResponse(body, 500, headers={REQUEST_ID_HEADER.decode(): rid})


async def _http_error(request: Request, exc: HTTPException):
    count_answer(request.scope, exc.status_code)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    detail = str(exc.detail)
    if detail == "There was an error parsing the body":  # FastAPI's words for JSON it could not decode
        detail = "body: not JSON this server can read (not UTF-8, or nested too deep)"
    body = error_body(exc.status_code, detail, code)
    return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


async def _invalid_body(request: Request, exc: RequestValidationError):
    """400, as OpenAI and vLLM answer (FastAPI's 422 is no BadRequestError to the openai client),
    naming the first field at fault as `param`, and each of them in `fields`."""
    count_answer(request.scope, 400)
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.lower():  # FastAPI then reads no JSON (curl -d sends a form)
        reason = f"send the body as JSON, with Content-Type: application/json (not {content_type!r})"
        fields = [{"field": "body", "message": reason}]
    else:
        fields = field_errors(exc.errors())
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    param = fields[0]["field"].removeprefix("body.") if fields and fields[0]["field"] != "body" else None
    body = error_body(400, message, "invalid_body", param)
    body["error"]["fields"] = fields  # every fault, where error_body names one
    return JSONResponse(body, status_code=400)
