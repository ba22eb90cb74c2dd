"""FastAPI dependencies every route uses: the app context and the caller's role.

Every route declares who may call it, either ``Depends(require_role("operator", ...))`` or
``Depends(public)`` for the few unauthenticated ones (health, metrics). No role implies
another: a route open to admins lists ``"admin"``. The test suite checks that every route
declares one of the two. The CLI's in-process calls at the data directory are the local
principal, admitted by every role check (:mod:`trustfleet.server.local` says why that is
safe).

The dependencies are coroutines: FastAPI runs a plain function in the thread pool, a hop
that costs about 100 µs of CPU here (bench/RESULTS.md), more than the token check itself.
The check is one indexed read, with the token's last-used refresh when it is due (once a
minute at most, best effort: it never waits for another writer and never fails the
request), run by :func:`run_database_work` (on the event loop on SQLite, which it explains
is safe); the audit record of a refused token, when the refusal rate limit writes one, goes
to the thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, TypeVar, cast

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trustfleet.errors import Forbidden
from trustfleet.server.auth import AuthenticationFailed, Principal, authenticate
from trustfleet.server.context import AppContext
from trustfleet.server.local import LOCAL_PRINCIPAL, is_local
from trustfleet.server.models import ROLES
from trustfleet.store import WriteLockBusy

__all__ = [
    "Principal",
    "RoleRequirement",
    "get_context",
    "public",
    "require_role",
    "run_database_work",
]

T = TypeVar("T")

log = logging.getLogger("trustfleet.server.auth")

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token: `Authorization: Bearer tf_...`",
)
_PRINCIPAL_STATE = "trustfleet_principal"
_AUDITOR_STATE = "trustfleet_refusal_auditor"


def context_of(request: Request) -> AppContext:
    return cast(AppContext, request.app.state.context)


async def get_context(request: Request) -> AppContext:
    return context_of(request)


async def public() -> None:
    """Marks a route as deliberately open to unauthenticated callers."""


async def run_database_work(context: AppContext, work: Callable[[], T]) -> T:
    """Run ``work`` (a use case: statements, key store calls, crypto) for a hot route.

    On SQLite it runs first right here on the event loop: its statements take microseconds
    and a read never waits (WAL). Its writes do not wait either
    (:meth:`~trustfleet.store.Database.without_waiting`): should another writer hold the
    write lock (a batch of a bulk import, say), its first unit of work fails before writing
    anything, and the whole work runs again in the thread pool, where it waits its turn (up
    to the busy timeout, then 503 ``database-busy``) while the loop serves other requests.
    On PostgreSQL every statement is a network round trip, so the work goes to the thread
    pool as for any other route.
    """
    if context.engine.dialect.name == "sqlite":
        try:
            with context.db.without_waiting():
                return work()
        except WriteLockBusy:
            pass  # nothing was written: run it again where it may wait
    return await anyio.to_thread.run_sync(work)


def _route_name(request: Request) -> str:
    # the route template, not the raw path: the raw path is the caller's to choose
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def bearer_credentials(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (as FastAPI's HTTPBearer
    reads it); ``"?"`` when the header is there but is not a Bearer credential, so that it
    is refused as malformed rather than as missing."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return "?"
    return credentials


def audit_refusal(
    context: AppContext, subject: str, action: str, actor: str, details: dict[str, object]
) -> None:
    """The audit record of a refused request by an authenticated caller (``auth.forbidden``)."""
    try:
        with context.db.work() as work:
            work.audit(action, actor=actor, subject=subject, outcome="failure", details=details)
    except Exception:
        # the request is refused either way; a failed audit write must not turn 403 into 500
        log.exception("could not write the %s audit record", action)


#: ``(action, actor, details)`` -> audits the refusal
RefusalAuditor = Callable[[str, str, dict[str, object]], Awaitable[None]]


def refusal_auditor(context: AppContext, subject: str, client: str) -> RefusalAuditor:
    """Audits a request's refusals, at most one per request however many checks refuse it;
    writes go to the thread pool. A refused token (``auth.failed``: no authenticated
    caller to hold to account) goes through the context's rate limit
    (:mod:`trustfleet.store.refusals`): a client's first of a window is written, the others
    counted into one aggregate record. A refused role (``auth.forbidden``) is the act of a
    token holder and is written each time."""
    written = False

    async def refuse(action: str, actor: str, details: dict[str, object]) -> None:
        nonlocal written
        if written:
            return
        written = True
        if action != "auth.failed":
            write = partial(
                audit_refusal, context, subject, action, actor, {**details, "client": client}
            )
            await anyio.to_thread.run_sync(write)
            return
        due = context.refusals.note(
            action,
            actor=actor,
            subject=subject,
            client=client,
            kind=str(details.get("reason", "")),
            details=details,
        )
        if due:
            await anyio.to_thread.run_sync(context.refusals.write, due)

    return refuse


async def authenticate_bearer(
    context: AppContext, presented: str | None, refuse: RefusalAuditor
) -> Principal:
    """The principal of a presented token; a refused token is audited (``refuse``) and
    raises :class:`AuthenticationFailed`."""
    try:
        return await run_database_work(context, partial(authenticate, context.db, presented))
    except AuthenticationFailed as exc:
        await refuse_authentication(exc, refuse)
        raise


async def refuse_authentication(exc: AuthenticationFailed, refuse: RefusalAuditor) -> None:
    """Audit (``auth.failed``) and log a refused token; the caller raises ``exc``."""
    details: dict[str, object] = {"reason": exc.reason}
    if exc.token_id is not None:
        details["token_id"] = exc.token_id
    await refuse("auth.failed", "unauthenticated", details)
    log.info("authentication failed: %s", exc.reason)


async def require_roles(
    principal: Principal, roles: frozenset[str], refuse: RefusalAuditor
) -> None:
    """Refuse (audited, :class:`Forbidden`) a principal whose role is not in ``roles``."""
    if principal.role not in roles:
        await refuse("auth.forbidden", principal.actor, {"role": principal.role})
        raise Forbidden(f"this needs one of the roles: {', '.join(sorted(roles))}")


def _request_refusals(request: Request) -> RefusalAuditor:
    """The request's refusal auditor, kept in its scope: several dependencies may refuse."""
    state = request.scope.setdefault("state", {})
    refuse = state.get(_AUDITOR_STATE)
    if refuse is None:
        client = request.client.host if request.client else ""
        subject = f"{request.method} {_route_name(request)}"
        refuse = state[_AUDITOR_STATE] = refusal_auditor(context_of(request), subject, client)
    return cast(RefusalAuditor, refuse)


async def _principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    if is_local(request.scope):
        return LOCAL_PRINCIPAL
    state = request.scope.setdefault("state", {})  # request.state raises on a miss: slow
    cached = state.get(_PRINCIPAL_STATE)
    if isinstance(cached, Principal):
        return cached
    presented = credentials.credentials if credentials is not None else None
    if presented is None and request.headers.get("authorization"):
        presented = "?"  # present but not a Bearer credential: refused as malformed
    principal = await authenticate_bearer(
        context_of(request), presented, _request_refusals(request)
    )
    state[_PRINCIPAL_STATE] = principal
    return principal


class RoleRequirement:
    """The dependency :func:`require_role` returns; ``roles`` is what the route admits."""

    def __init__(self, roles: frozenset[str]) -> None:
        self.roles = roles

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = await _principal(request, credentials)
        if not principal.local:
            await require_roles(principal, self.roles, _request_refusals(request))
        return principal


def require_role(*roles: str) -> RoleRequirement:
    """A dependency admitting only tokens whose role is one of ``roles``."""
    unknown = set(roles) - ROLES
    if not roles or unknown:
        raise ValueError(f"require_role needs known roles, got {sorted(roles)}")
    return RoleRequirement(frozenset(roles))
