"""Pure ASGI middleware: request context (id, access log, metrics, last-resort 500), the
request body limit, and ``OPTIONS``."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustfleet.server.logging import RequestLogContext, request_log_context
from trustfleet.server.metrics import Metrics, route_template
from trustfleet.server.problems import (
    PROBLEM_MEDIA_TYPE,
    body_limit_problem,
    internal_error_body,
    render_problem,
)
from trustfleet.server.routing import OPTIONS, allow_header, allowed_methods

REQUEST_ID_HEADER = "x-request-id"
MAX_LOGGED_PATH = 512
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

log = logging.getLogger("trustfleet.server")
access_log = logging.getLogger("trustfleet.access")


async def send_problem(
    send: Send, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = render_problem(body)
    raw_headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(payload)).encode()),
    ] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": body["status"], "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def declared_length_problem(
    scope: Scope, limit: int, request_id: str | None
) -> dict[str, Any] | None:
    """The problem of a request whose Content-Length is over ``limit`` (413) or is not a
    number (400); None when the declared length, if any, is within the limit."""
    declared = header_value(scope, b"content-length")
    if declared is None:
        return None
    bad_length = not declared.strip().isdigit()
    if not bad_length and int(declared) <= limit:
        return None
    return body_limit_problem(
        limit, bad_length=bad_length, instance=scope.get("path"), request_id=request_id
    )


def request_id_of(scope: Scope) -> str:
    """The caller's X-Request-ID when it is short and plain, else a fresh one."""
    offered = header_value(scope, REQUEST_ID_HEADER.encode())
    if offered and _VALID_REQUEST_ID.fullmatch(offered):
        return offered
    return secrets.token_hex(8)


class RequestContextMiddleware:
    """Outermost: gives each request an id (echoed in ``X-Request-ID``), logs one access line,
    records metrics by route template, and turns any exception that escaped every handler
    into a logged 500 ``internal-error`` problem that says nothing about the cause."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        reset_token = request_log_context.set(
            RequestLogContext(request_id, scope["method"], scope["path"][:MAX_LOGGED_PATH])
        )
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = [h for h in message.get("headers", ()) if h[0] != _REQUEST_ID_BYTES]
                message["headers"] = [*headers, (_REQUEST_ID_BYTES, request_id.encode())]
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error while answering the request")
            if started:  # too late for a problem document: let the server drop the connection
                raise
            await send_problem(send_with_id, internal_error_body(request_id))
        finally:
            seconds = time.perf_counter() - began
            route = route_template(scope)
            self.metrics.observe_request(scope["method"], route, status, seconds)
            access_log.info(
                "request",
                extra={"route": route, "status": status, "duration_ms": round(seconds * 1e3, 3)},
            )
            request_log_context.reset(reset_token)


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once the streamed body passes the limit. An HTTPException so
    FastAPI's body reader re-raises it as is and the problem handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes")
        self.limit = limit


class BodyLimitMiddleware:
    """Refuses bodies over the limit: at once when ``Content-Length`` says so, else by counting
    the bytes as they stream in (chunked uploads have no length to trust).

    ``limit_for(scope)`` gives the limit of a request (the settings' ``max_body_bytes``, or
    ``max_import_bytes`` for routes marked as streamed imports).
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        problem = declared_length_problem(scope, limit, scope.get("state", {}).get("request_id"))
        if problem is not None:
            await _refuse(send, problem)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            request_id = scope.get("state", {}).get("request_id")
            problem = body_limit_problem(
                limit, bad_length=False, instance=scope.get("path"), request_id=request_id
            )
            await _refuse(send, problem)


async def _refuse(send: Send, problem: dict[str, Any]) -> None:
    # the unread body stays on the wire: ask the client not to reuse the connection
    await send_problem(send, problem, {"connection": "close"})


class OptionsMiddleware:
    """Answers ``OPTIONS`` for every known path: 204 with ``Allow`` listing every method of
    the path (routes are matched by their path template; a parameter's pattern is checked
    only by the method itself). An unknown path goes on to the router's 404 problem. No
    token is needed: the methods are in the public OpenAPI document anyway."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != OPTIONS:
            await self.app(scope, receive, send)
            return
        methods = allowed_methods(self.routes, scope["path"])
        if methods is None:
            await self.app(scope, receive, send)
            return
        headers = [(b"allow", allow_header(methods).encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
