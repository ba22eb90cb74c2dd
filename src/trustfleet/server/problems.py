"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

The body is ``{type, title, status, detail, code, instance?, request_id?}`` (plus ``errors``
for request validation). ``code`` is the stable machine code (the same as
:attr:`trustfleet.errors.TrustfleetError.code`); ``type`` is ``urn:trustfleet:problem:<code>``.
Nothing from the request body is echoed back, and echoed names are clipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from trustfleet.errors import TrustfleetError
from trustfleet.server.routing import allow_header, allowed_methods

PROBLEM_MEDIA_TYPE = "application/problem+json"
MAX_ECHO_CHARS = 200
MAX_FIELD_ERRORS = 20

log = logging.getLogger("trustfleet.server")

# codes for the HTTP errors Starlette/FastAPI raise themselves
_HTTP_CODES: Mapping[int, tuple[str, str]] = {
    400: ("bad-request", "The request could not be understood"),
    401: ("authentication-required", "A valid API token is required"),
    403: ("forbidden", "The token's role may not do this"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "The method is not allowed on this resource"),
    406: ("not-acceptable", "No acceptable representation"),
    408: ("request-timeout", "The request headers did not arrive in time"),
    409: ("conflict", "Conflicts with the current state"),
    413: ("body-too-large", "The request body is too large"),
    415: ("unsupported-media-type", "The content type is not supported"),
    422: ("invalid-request", "The request does not match the expected schema"),
    429: ("too-many-requests", "Too many requests"),
    431: ("headers-too-large", "The request headers are too large"),
    503: ("unavailable", "The service is unavailable"),
}


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_type(code: str) -> str:
    return f"urn:trustfleet:problem:{code}"


def _clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def problem_body(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str | None = None,
    request_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type(code),
        "title": title,
        "status": status,
        "detail": _clip(detail, 1000),
        "code": code,
    }
    if instance and len(instance) <= MAX_ECHO_CHARS:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    body.update(extra or {})
    return body


def render_problem(body: Mapping[str, Any]) -> bytes:
    """A problem document's bytes, exactly as :class:`ProblemResponse` renders them."""
    return json.dumps(
        body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


def error_problem(
    exc: TrustfleetError, *, instance: str | None, request_id: str | None
) -> dict[str, Any]:
    """The problem document of a raised trustfleet error (logged when it is a 5xx; one
    that says when to retry, e.g. a busy database, is a warning without a traceback)."""
    if exc.status >= 500 and getattr(exc, "retry_after", None) is not None:
        log.warning("request refused for now: %s [%s]", exc.message, exc.code)
    elif exc.status >= 500:
        log.error("request failed: %s [%s]", exc.message, exc.code, exc_info=exc)
    return problem_body(
        status=exc.status,
        code=exc.code,
        title=exc.title,
        detail=exc.message,
        instance=instance,
        request_id=request_id,
    )


def body_limit_problem(
    limit: int, *, bad_length: bool, instance: str | None, request_id: str | None
) -> dict[str, Any]:
    """413 for a body over ``limit``, 400 for a Content-Length that is not a number."""
    if bad_length:
        return problem_body(
            status=400,
            code="bad-request",
            title="The request could not be understood",
            detail="Content-Length is not a number",
            instance=instance,
            request_id=request_id,
        )
    return problem_body(
        status=413,
        code="body-too-large",
        title="The request body is too large",
        detail=f"The request body exceeds the limit of {limit} bytes",
        instance=instance,
        request_id=request_id,
    )


def problem_response(
    request: Request | None,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    instance = request.url.path if request is not None else None
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    body = problem_body(
        status=status,
        code=code,
        title=title,
        detail=detail,
        instance=instance,
        request_id=request_id,
        extra=extra,
    )
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def http_problem_code(status: int) -> tuple[str, str]:
    """The (code, title) for a bare HTTP status."""
    return _HTTP_CODES.get(status, (f"http-{status}", "HTTP error"))


def _auth_headers(status: int) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else {}


def error_headers(exc: TrustfleetError) -> dict[str, str]:
    """The headers of an error's answer: ``WWW-Authenticate`` for a 401, ``Retry-After`` for
    an error that says when to retry (a ``retry_after`` attribute, in seconds: 503
    ``database-busy``)."""
    headers = _auth_headers(exc.status)
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int):
        headers["Retry-After"] = str(retry_after)
    return headers


async def _trustfleet_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TrustfleetError)
    request_id = getattr(request.state, "request_id", None)
    body = error_problem(exc, instance=request.url.path, request_id=request_id)
    return ProblemResponse(body, status_code=exc.status, headers=error_headers(exc))


def _malformed_json(request: Request) -> Response:
    return problem_response(
        request,
        status=400,
        code="malformed-json",
        title="The request body is not valid JSON",
        detail="The request body could not be parsed as JSON",
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        # FastAPI's "error parsing the body": not UTF-8, or nested too deep for json
        return _malformed_json(request)
    code, title = http_problem_code(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = {**_auth_headers(exc.status_code), **(exc.headers or {})}
    if exc.status_code == 405:
        # Starlette names the methods of the one route it tried; the path may have more
        methods = allowed_methods(request.app.routes, request.scope["path"])
        if methods is not None:
            headers["Allow"] = allow_header(methods)
    return problem_response(
        request, status=exc.status_code, code=code, title=title, detail=detail, headers=headers
    )


def _field_error(error: Mapping[str, Any]) -> dict[str, Any]:
    # never "input" or "ctx": they carry the caller's (possibly huge or secret) values
    loc = [part if isinstance(part, int) else _clip(str(part), 64) for part in error["loc"]]
    return {"loc": loc, "msg": _clip(str(error.get("msg", ""))), "type": str(error["type"])}


def field_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [_field_error(error) for error in errors[:MAX_FIELD_ERRORS]]


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(error.get("type") == "json_invalid" for error in errors):
        return _malformed_json(request)
    return problem_response(
        request,
        status=422,
        code="invalid-request",
        title="The request does not match the expected schema",
        detail=f"{len(errors)} field error(s)",
        extra={"errors": field_errors(errors)},
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Map trustfleet errors, validation errors and HTTP errors to problem+json.

    Unexpected exceptions are answered by the request middleware (500 internal-error),
    which also logs them with the request id.
    """
    app.add_exception_handler(TrustfleetError, _trustfleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def internal_error_body(request_id: str | None) -> dict[str, Any]:
    return problem_body(
        status=500,
        code="internal-error",
        title="Internal error",
        detail="The server failed to handle the request; the error was logged"
        + (f" under request id {request_id}" if request_id else ""),
        request_id=request_id,
    )
