"""The spine's routes: health, readiness, metrics, API tokens, ``whoami`` and the audit log.

``/healthz``, ``/readyz`` and ``/metrics`` need no token (load balancers and Prometheus call
them; they disclose no identifiers). Tokens are changed by the ``admin`` role only; the
``auditor`` role reads them and the audit log. ``/v1/whoami`` answers any valid token.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import literal, select

from trustfleet.errors import TrustfleetError
from trustfleet.server.audit_trail import verify_audit
from trustfleet.server.auth import (
    MAX_NAME_CHARS,
    MAX_TOKEN_ID,
    MAX_TTL,
    MIN_TTL,
    TokenInfo,
    create_token,
    find_token,
    get_token,
    list_tokens,
    revoke_token,
)
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, public, require_role
from trustfleet.server.metrics import Metrics
from trustfleet.server.models import ROLES, Role
from trustfleet.server.paging import (
    DEFAULT_LIMIT,
    CursorParam,
    InvalidCursor,
    LimitParam,
    decode_cursor,
    encode_cursor,
)
from trustfleet.store import MAX_INTEGER, audit
from trustfleet.wire import as_utc

log = logging.getLogger("trustfleet.server")

router = APIRouter()
Context = Annotated[AppContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
AdminOrAuditor = Annotated[Principal, Depends(require_role(Role.ADMIN, Role.AUDITOR))]
AnyRole = Annotated[Principal, Depends(require_role(*sorted(ROLES)))]
MAX_SEQ = MAX_INTEGER  # audit records' seq is an Integer column
AUDIT_LISTING = "audit"
_SELECT_ONE = select(literal(1))


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _rfc3339_only(value: object) -> object:
    """Refuse what pydantic would read as a time but the document's ``date-time`` is not: a
    number (seconds since the epoch) or a bare date."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


#: a query parameter's time: RFC 3339 only, as documented
Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339_only)]


class NotReady(TrustfleetError):
    code = "not-ready"
    status = 503
    title = "A dependency of this node is not reachable"


class Status(BaseModel):
    status: str


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="Who uses it; unique among all tokens ever made",
    )
    role: Role
    ttl_seconds: int | None = Field(
        default=None,
        ge=int(MIN_TTL.total_seconds()),
        le=int(MAX_TTL.total_seconds()),
        description="Expire this many seconds after creation (default: never)",
    )


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    active: bool = Field(description="Neither revoked nor expired")

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        return cls(
            id=info.id,
            name=info.name,
            role=info.role,
            created_at=info.created_at,
            expires_at=info.expires_at,
            revoked_at=info.revoked_at,
            last_used_at=info.last_used_at,
            active=info.active,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="The token text; shown this once and never again")


class AuditRecordOut(BaseModel):
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    outcome: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, rec: audit.ChainedRecord) -> AuditRecordOut:
        return cls(
            seq=rec.seq,
            at=as_utc(rec.at),
            actor=rec.actor,
            action=rec.action,
            subject=rec.subject,
            outcome=rec.outcome,
            details=_details(rec.details),
            prev_hash=rec.prev_hash,
            hash=rec.hash,
        )


class AuditPage(BaseModel):
    items: list[AuditRecordOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page")


class WhoAmI(BaseModel):
    name: str
    role: str = Field(description="The token's role; local for the CLI at the data directory")
    actor: str = Field(description="How the audit log names this caller")
    token_id: int | None
    expires_at: datetime | None
    local: bool = Field(description="True for the CLI's in-process calls (no token)")


class ChainProblemOut(BaseModel):
    seq: int
    problem: str


class ChainReportOut(BaseModel):
    ok: bool
    records: int
    problems: list[ChainProblemOut]
    #: signed checkpoints in the database
    checkpoints: int = 0
    #: the audit devices compared with the database (this node's file device)
    devices: list[str] = Field(default_factory=list)


class AuditCheckpointOut(BaseModel):
    seq: int
    at: datetime
    head_hash: str
    every: int
    key_handle: str
    signature: str


def _details(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unparsable": True}
    return value if isinstance(value, dict) else {"value": value}


# --- health and metrics -------------------------------------------------------------


@router.get("/healthz", tags=["health"], dependencies=[Depends(public)])
async def healthz() -> Status:
    """Liveness: the process answers. Checks nothing else, and runs on the event loop (no
    thread, no database): a thread pool full of requests waiting for the database does not
    delay it."""
    return Status(status="ok")


@router.get(
    "/readyz",
    tags=["health"],
    dependencies=[Depends(public)],
    responses={503: {"description": "The database or the key store is not reachable"}},
)
def readyz(context: Context) -> Status:
    """Readiness: the database answers a query and the key store answers."""
    try:
        context.db.read(lambda reads: reads.scalar(_SELECT_ONE))
    except Exception as exc:
        log.warning("not ready: database check failed", exc_info=exc)
        raise NotReady("the database is not reachable") from exc
    try:
        ping = getattr(context.keystore, "ping", None)
        if callable(ping):
            ping()
        else:
            context.keystore.list()
    except Exception as exc:
        log.warning("not ready: key store check failed", exc_info=exc)
        raise NotReady("the key store is not reachable") from exc
    return Status(status="ready")


@router.get(
    "/metrics",
    tags=["health"],
    dependencies=[Depends(public)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this node (no token needed; no identifiers in the series). On
    the event loop, like ``/healthz``: it reads only this process's counters."""
    collected: Metrics = request.app.state.metrics
    return Response(collected.render(), media_type=collected.content_type)


# --- tokens -------------------------------------------------------------------------


@router.post("/v1/tokens", tags=["tokens"], status_code=201)
def create_api_token(
    body: TokenCreate, context: Context, principal: Admin, response: Response
) -> TokenCreated:
    """Create a token. Its text is in this response only: store it now. A name any token
    ever had is refused (409 ``token-name-taken``)."""
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds is not None else None
    plaintext, info = create_token(
        context.db, name=body.name, role=body.role, actor=principal.actor, ttl=ttl
    )
    response.headers["Cache-Control"] = "no-store"
    return TokenCreated(token=plaintext, **TokenOut.of(info).model_dump())


@router.get("/v1/tokens", tags=["tokens"])
def list_api_tokens(
    context: Context,
    principal: AdminOrAuditor,
    name: Annotated[
        str | None,
        Query(min_length=1, max_length=MAX_NAME_CHARS, description="Only the token of this name"),
    ] = None,
) -> list[TokenOut]:
    """Every token (never its text), revoked and expired ones included; with ``name``, the
    one token of that name (404 ``token-not-found`` if none)."""
    if name is not None:
        return [TokenOut.of(find_token(context.db, name))]
    return [TokenOut.of(info) for info in list_tokens(context.db, actor=principal.actor)]


TokenId = Annotated[int, Path(ge=1, le=MAX_TOKEN_ID)]


@router.get("/v1/tokens/{token_id}", tags=["tokens"])
def get_api_token(token_id: TokenId, context: Context, principal: AdminOrAuditor) -> TokenOut:
    """One token (never its text)."""
    return TokenOut.of(get_token(context.db, token_id))


@router.delete("/v1/tokens/{token_id}", tags=["tokens"])
def revoke_api_token(token_id: TokenId, context: Context, principal: Admin) -> TokenOut:
    """Revoke a token: every node refuses it from the next request on."""
    return TokenOut.of(revoke_token(context.db, token_id, actor=principal.actor))


@router.get("/v1/whoami", tags=["tokens"])
def whoami(principal: AnyRole) -> WhoAmI:
    """The caller: the presented token's name, role and expiry."""
    return WhoAmI(
        name=principal.name,
        role=principal.role,
        actor=principal.actor,
        token_id=None if principal.local else principal.token_id,
        expires_at=principal.expires_at,
        local=principal.local,
    )


# --- audit log ----------------------------------------------------------------------


@router.get("/v1/audit", tags=["audit"])
def read_audit_log(
    context: Context,
    principal: AdminOrAuditor,
    action: Annotated[
        str | None,
        Query(min_length=1, max_length=100, description="Exact, or a prefix ending in *: tmk.*"),
    ] = None,
    actor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    since: Annotated[Rfc3339 | None, Query(description="Records at or after this time")] = None,
    until: Annotated[Rfc3339 | None, Query(description="Records before this time")] = None,
    after_seq: Annotated[
        int, Query(ge=0, le=MAX_SEQ, description="Only records after this sequence number")
    ] = 0,
    cursor: CursorParam = None,
    limit: LimitParam = DEFAULT_LIMIT,
) -> AuditPage:
    """Audit records matching every filter given, oldest first, one page at a time."""
    after = decode_cursor(AUDIT_LISTING, cursor)
    if after is not None:
        if not isinstance(after, int) or not 0 <= after <= MAX_SEQ:
            raise InvalidCursor("the cursor is malformed")
        after_seq = max(after_seq, after)
    rows = context.db.read(
        lambda reads: audit.find_records(
            reads,
            after_seq=after_seq,
            limit=limit,
            action=action,
            actor=actor,
            since=since,
            until=until,
        )
    )
    records = [AuditRecordOut.of(row) for row in rows]
    next_cursor = encode_cursor(AUDIT_LISTING, records[-1].seq) if len(records) == limit else None
    return AuditPage(items=records, next_cursor=next_cursor)


@router.get("/v1/audit/verify", tags=["audit"])
def verify_audit_log(context: Context, principal: AdminOrAuditor) -> ChainReportOut:
    """Walk the whole chain, check every signed checkpoint and that the chain reaches its
    head, and compare the database with this node's file device: ``ok`` is false if any
    record was edited, deleted, reordered or rewritten (docs/audit.md). Each problem names
    its record (``seq``; 0 for a device as a whole)."""
    report = verify_audit(context)
    return ChainReportOut(
        ok=report.ok,
        records=report.records,
        problems=[ChainProblemOut(seq=p.seq, problem=p.problem) for p in report.problems],
        checkpoints=report.checkpoints,
        devices=report.devices,
    )


@router.get("/v1/audit/checkpoints", tags=["audit"])
def list_audit_checkpoints(context: Context, principal: AdminOrAuditor) -> list[AuditCheckpointOut]:
    """Every signed checkpoint of the chain's head, oldest first (one per
    ``audit_checkpoint_every`` records), as stored in the database."""
    rows = context.db.read(audit.checkpoints)
    return [
        AuditCheckpointOut(
            seq=row.seq,
            at=as_utc(row.at),
            head_hash=row.head_hash,
            every=row.every,
            key_handle=row.key_handle,
            signature=row.signature,
        )
        for row in rows
    ]
