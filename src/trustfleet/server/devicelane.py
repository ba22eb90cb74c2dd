"""Device routes: the few device-facing routes a fleet's traffic goes through, answered by a
thin ASGI layer in front of FastAPI.

A TMK download is three requests whose own work is a fraction of a millisecond, while
FastAPI's routing, dependency injection and middleware stack cost more CPU per request than
a download step's own work (bench/RESULTS.md has the figures). So a device route is
declared once (:class:`trustfleet.kit.routes.DeviceRoutes`), as a :data:`DeviceHandler`
``(context, principal, params, body) -> DeviceAnswer``, and is served two ways that answer
alike (the tests check it):

- :class:`DeviceLane`, an ASGI layer outside trustfleet's middleware, answers a request
  that matches a device route exactly (method, path, parameter patterns) by itself;
- the domain's FastAPI route of the same path calls the same handler through
  :func:`answer_in_fastapi`: it documents the route in OpenAPI and answers when the app is
  built without the lane.

The lane keeps every promise the FastAPI stack makes: the request id (``X-Request-ID``),
log context, access line and metrics of
:class:`~trustfleet.server.middleware.RequestContextMiddleware`; the body limit of
:class:`~trustfleet.server.middleware.BodyLimitMiddleware`; the bearer-token check, role
check and refusal audit of :mod:`trustfleet.server.deps` (shared code); problem+json errors
with stable codes; a logged 500 ``internal-error`` for anything unexpected. A request that
matches no device route (a malformed session id, another method) goes on to FastAPI.

The lane reads the body (within the limit) before it checks the token, as FastAPI does, so
that the token check and the handler are one piece of database work: on PostgreSQL, one
hop to the thread pool per request instead of two.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from trustfleet.errors import TrustfleetError
from trustfleet.server.auth import AuthenticationFailed, Principal, authenticate
from trustfleet.server.context import AppContext
from trustfleet.server.deps import (
    RefusalAuditor,
    bearer_credentials,
    context_of,
    refusal_auditor,
    refuse_authentication,
    require_roles,
    run_database_work,
)
from trustfleet.server.logging import RequestLogContext, request_log_context
from trustfleet.server.metrics import Metrics
from trustfleet.server.middleware import (
    MAX_LOGGED_PATH,
    REQUEST_ID_HEADER,
    access_log,
    declared_length_problem,
    header_value,
    request_id_of,
)
from trustfleet.server.problems import (
    PROBLEM_MEDIA_TYPE,
    body_limit_problem,
    error_headers,
    error_problem,
    internal_error_body,
    render_problem,
)

log = logging.getLogger("trustfleet.server")

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_CONNECTION_CLOSE = [(b"connection", b"close")]


@dataclass(frozen=True)
class DeviceAnswer:
    """A device route's successful answer: the exact body bytes."""

    body: bytes
    media_type: str = "application/json"
    status: int = 200


#: ``(context, principal, path parameters, request body) -> answer``: database work, run
#: by :func:`~trustfleet.server.deps.run_database_work` (on the event loop on SQLite, in a
#: worker thread on PostgreSQL) right after the token check, in the same hop; errors are
#: raised as :class:`~trustfleet.errors.TrustfleetError` and become problem+json
DeviceHandler = Callable[[AppContext, Principal, Mapping[str, str], bytes], DeviceAnswer]


#: the principal a public device route's handler is given: no token was presented
PUBLIC_CALLER = Principal(name="unauthenticated", role="", token_id=0)
#: the parameter a public device route's handler finds the client's address in (for the
#: rate-limited audit of refusals, :mod:`trustfleet.store.refusals`)
CLIENT_PARAM = "@client"


@dataclass(frozen=True)
class DeviceRoute:
    """One device route: ``path`` is a FastAPI path template (it is also the metrics and
    log label), ``params`` the full-match pattern of each ``{parameter}`` in it."""

    method: str
    path: str
    roles: frozenset[str]
    handler: DeviceHandler
    params: Mapping[str, str] = field(default_factory=dict)
    #: no API token: the handler authenticates the request itself (a third party's signed
    #: webhook, say) and is given :data:`PUBLIC_CALLER` as its principal
    public: bool = False
    #: request headers the handler reads, as extra parameters: parameter name -> header
    #: name (lower case); a missing header is ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def pattern(self) -> re.Pattern[str]:
        parts, end = [], 0
        for found in _PARAMETER.finditer(self.path):
            name = found.group(1)
            parts += [re.escape(self.path[end : found.start()]), f"(?P<{name}>{self.params[name]})"]
            end = found.end()
        parts.append(re.escape(self.path[end:]))
        return re.compile("".join(parts))


async def answer_in_fastapi(
    request: Request, principal: Principal, handler: DeviceHandler
) -> Response:
    """A device handler behind a FastAPI route (authenticated by the route's dependency)."""
    context, body = context_of(request), await request.body()
    work = partial(handler, context, principal, request.path_params, body)
    answer = await run_database_work(context, work)
    return Response(answer.body, status_code=answer.status, media_type=answer.media_type)


def _authorized_answer(
    context: AppContext,
    route: DeviceRoute,
    presented: str | None,
    params: Mapping[str, str],
    body: bytes,
) -> tuple[Principal, DeviceAnswer | None]:
    """The token check, then the handler if the token's role may use the route (None if
    not: the caller refuses it). One piece of database work: one thread hop on PostgreSQL."""
    principal = authenticate(context.db, presented)
    if principal.role not in route.roles:
        return principal, None
    return principal, route.handler(context, principal, params, body)


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    media_type: str
    headers: list[tuple[bytes, bytes]]


class _Refused(Exception):
    """The request was refused before its handler ran (its body is too large)."""

    def __init__(self, reply: _Reply) -> None:
        self.reply = reply


class _Disconnected(Exception):
    """The client went away before its body arrived: there is nobody to answer."""


def _problem_reply(body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> _Reply:
    return _Reply(body["status"], render_problem(body), PROBLEM_MEDIA_TYPE, headers)


class DeviceLane:
    """Outermost ASGI layer: answers the device routes, hands everything else to ``app``."""

    def __init__(
        self, app: ASGIApp, context: AppContext, metrics: Metrics, routes: Sequence[DeviceRoute]
    ) -> None:
        self.app = app
        self._context = context
        self._metrics = metrics
        self._routes = [(route, route.pattern()) for route in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for route, pattern in self._routes:
                if route.method == method and (found := pattern.fullmatch(path)):
                    await self._serve(route, found.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: DeviceRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        request_id = request_id_of(scope)
        reset_token = request_log_context.set(
            RequestLogContext(request_id, route.method, scope["path"][:MAX_LOGGED_PATH])
        )
        began, status = time.perf_counter(), 500
        try:
            reply = await self._reply(route, params, scope, receive, request_id)
            status = reply.status
            headers = [
                (b"content-type", reply.media_type.encode()),
                (b"content-length", str(len(reply.body)).encode()),
                (_REQUEST_ID_BYTES, request_id.encode()),
                *reply.headers,
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
        except _Disconnected:
            status = 499  # nginx's "client closed request": nothing was sent
        finally:
            seconds = time.perf_counter() - began
            self._metrics.observe_request(route.method, route.path, status, seconds)
            access_log.info(
                "request",
                extra={
                    "route": route.path,
                    "status": status,
                    "duration_ms": round(seconds * 1e3, 3),
                },
            )
            request_log_context.reset(reset_token)

    async def _reply(
        self,
        route: DeviceRoute,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        request_id: str,
    ) -> _Reply:
        instance = scope["path"]
        try:
            limit = self._context.settings.max_body_bytes
            problem = declared_length_problem(scope, limit, request_id)
            if problem is not None:
                return _problem_reply(problem, _CONNECTION_CLOSE)
            body = await _read_body(receive, limit, instance, request_id)
            answer = await self._answer(route, params, scope, body)
        except _Refused as refused:
            return refused.reply
        except TrustfleetError as exc:
            problem = error_problem(exc, instance=instance, request_id=request_id)
            headers = [(k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()]
            return _problem_reply(problem, headers)
        except _Disconnected:
            raise
        except Exception:
            log.exception("unhandled error while answering the request")
            return _problem_reply(internal_error_body(request_id), [])
        return _Reply(answer.status, answer.body, answer.media_type, [])

    async def _answer(
        self, route: DeviceRoute, params: dict[str, str], scope: Scope, body: bytes
    ) -> DeviceAnswer:
        if route.public:
            for name, header in route.headers.items():
                params[name] = header_value(scope, header.encode()) or ""
            client = scope.get("client")
            params[CLIENT_PARAM] = client[0] if client else ""
            handle = partial(route.handler, self._context, PUBLIC_CALLER, params, body)
            return await run_database_work(self._context, handle)
        presented = bearer_credentials(header_value(scope, b"authorization"))
        work = partial(_authorized_answer, self._context, route, presented, params, body)
        try:
            principal, answer = await run_database_work(self._context, work)
        except AuthenticationFailed as exc:
            await refuse_authentication(exc, self._refusals(route, scope))
            raise
        if answer is None:
            await require_roles(principal, route.roles, self._refusals(route, scope))
            raise AssertionError("require_roles refuses a role the route does not admit")
        return answer

    def _refusals(self, route: DeviceRoute, scope: Scope) -> RefusalAuditor:
        client = scope.get("client")
        subject = f"{route.method} {route.path}"
        return refusal_auditor(self._context, subject, client[0] if client else "")


async def _read_body(receive: Receive, limit: int, instance: str, request_id: str) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            problem = body_limit_problem(
                limit, bad_length=False, instance=instance, request_id=request_id
            )
            raise _Refused(_problem_reply(problem, _CONNECTION_CLOSE))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
