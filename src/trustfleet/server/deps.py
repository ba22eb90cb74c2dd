"""FastAPI dependencies every route uses: the app context and the caller's role.

Every route declares who may call it, either ``Depends(require_role("operator", ...))`` or
``Depends(public)`` for the few unauthenticated ones (health, metrics). No role implies
another: a route open to admins lists ``"admin"``. The test suite checks that every route
declares one of the two.
"""

from __future__ import annotations

import logging
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trustfleet.db import transaction
from trustfleet.errors import Forbidden
from trustfleet.server import audit
from trustfleet.server.auth import AuthenticationFailed, Principal, authenticate
from trustfleet.server.context import AppContext
from trustfleet.server.models import ROLES

__all__ = ["Principal", "RoleRequirement", "get_context", "public", "require_role"]

log = logging.getLogger("trustfleet.server.auth")

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token: `Authorization: Bearer tf_...`",
)
_PRINCIPAL_STATE = "trustfleet_principal"
_AUDITED_STATE = "trustfleet_auth_failure_audited"


def get_context(request: Request) -> AppContext:
    return cast(AppContext, request.app.state.context)


def public() -> None:
    """Marks a route as deliberately open to unauthenticated callers."""


def _route_name(request: Request) -> str:
    # the route template, not the raw path: the raw path is the caller's to choose
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def _audit_failure_once(
    request: Request, action: str, actor: str, details: dict[str, object]
) -> None:
    """One audit record per refused request at most, however many checks refuse it."""
    if getattr(request.state, _AUDITED_STATE, False):
        return
    setattr(request.state, _AUDITED_STATE, True)
    client = request.client.host if request.client else ""
    try:
        with transaction(get_context(request).sessions) as session:
            audit.append(
                session,
                action=action,
                actor=actor,
                subject=f"{request.method} {_route_name(request)}",
                outcome="failure",
                details={**details, "client": client},
            )
    except Exception:
        # the request is refused either way; a failed audit write must not turn 401/403 into 500
        log.exception("could not write the %s audit record", action)


def _principal(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    cached = getattr(request.state, _PRINCIPAL_STATE, None)
    if isinstance(cached, Principal):
        return cached
    presented = credentials.credentials if credentials is not None else None
    if presented is None and request.headers.get("authorization"):
        presented = "?"  # present but not a Bearer credential: refused as malformed
    try:
        principal = authenticate(get_context(request).sessions, presented)
    except AuthenticationFailed as exc:
        details: dict[str, object] = {"reason": exc.reason}
        if exc.token_id is not None:
            details["token_id"] = exc.token_id
        _audit_failure_once(request, "auth.failed", "unauthenticated", details)
        log.info("authentication failed: %s", exc.reason)
        raise
    setattr(request.state, _PRINCIPAL_STATE, principal)
    return principal


class RoleRequirement:
    """The dependency :func:`require_role` returns; ``roles`` is what the route admits."""

    def __init__(self, roles: frozenset[str]) -> None:
        self.roles = roles

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = _principal(request, credentials)
        if principal.role not in self.roles:
            _audit_failure_once(
                request, "auth.forbidden", principal.actor, {"role": principal.role}
            )
            raise Forbidden(f"this needs one of the roles: {', '.join(sorted(self.roles))}")
        return principal


def require_role(*roles: str) -> RoleRequirement:
    """A dependency admitting only tokens whose role is one of ``roles``."""
    unknown = set(roles) - ROLES
    if not roles or unknown:
        raise ValueError(f"require_role needs known roles, got {sorted(roles)}")
    return RoleRequirement(frozenset(roles))
