"""The spine's routes: health, readiness, metrics, API tokens and the audit log.

``/healthz``, ``/readyz`` and ``/metrics`` need no token (load balancers and Prometheus call
them; they disclose no identifiers). Everything under ``/v1/tokens`` and ``/v1/audit`` is
for the ``admin`` role only.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import literal, select

from trustfleet.errors import TrustfleetError
from trustfleet.server.auth import (
    MAX_NAME_CHARS,
    MAX_TOKEN_ID,
    TokenInfo,
    create_token,
    list_tokens,
    revoke_token,
)
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, public, require_role
from trustfleet.server.metrics import Metrics
from trustfleet.server.models import Role
from trustfleet.store import audit
from trustfleet.wire import as_utc

log = logging.getLogger("trustfleet.server")

router = APIRouter()
Context = Annotated[AppContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
MAX_SEQ = 2**63 - 1
_SELECT_ONE = select(literal(1))


class NotReady(TrustfleetError):
    code = "not-ready"
    status = 503
    title = "A dependency of this node is not reachable"


class Status(BaseModel):
    status: str


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="Who uses it")
    role: Role


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        return cls(
            id=info.id,
            name=info.name,
            role=info.role,
            created_at=info.created_at,
            revoked_at=info.revoked_at,
            last_used_at=info.last_used_at,
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
    records: list[AuditRecordOut]
    next_after_seq: int | None = Field(description="Pass as after_seq for the next page")


class ChainProblemOut(BaseModel):
    seq: int
    problem: str


class ChainReportOut(BaseModel):
    ok: bool
    records: int
    problems: list[ChainProblemOut]


def _details(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unparsable": True}
    return value if isinstance(value, dict) else {"value": value}


# --- health and metrics -------------------------------------------------------------


@router.get("/healthz", tags=["health"], dependencies=[Depends(public)])
def healthz() -> Status:
    """Liveness: the process answers. Checks nothing else."""
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
def metrics(request: Request) -> Response:
    """Prometheus metrics of this node (no token needed; no identifiers in the series)."""
    collected: Metrics = request.app.state.metrics
    return Response(collected.render(), media_type=collected.content_type)


# --- tokens -------------------------------------------------------------------------


@router.post("/v1/tokens", tags=["tokens"], status_code=201)
def create_api_token(
    body: TokenCreate, context: Context, principal: Admin, response: Response
) -> TokenCreated:
    """Create a token. Its text is in this response only: store it now."""
    plaintext, info = create_token(
        context.db, name=body.name, role=body.role, actor=principal.actor
    )
    response.headers["Cache-Control"] = "no-store"
    return TokenCreated(token=plaintext, **TokenOut.of(info).model_dump())


@router.get("/v1/tokens", tags=["tokens"])
def list_api_tokens(context: Context, principal: Admin) -> list[TokenOut]:
    """Every token (never its text), revoked ones included."""
    return [TokenOut.of(info) for info in list_tokens(context.db, actor=principal.actor)]


@router.delete("/v1/tokens/{token_id}", tags=["tokens"])
def revoke_api_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_TOKEN_ID)], context: Context, principal: Admin
) -> TokenOut:
    """Revoke a token: every node refuses it from the next request on."""
    return TokenOut.of(revoke_token(context.db, token_id, actor=principal.actor))


# --- audit log ----------------------------------------------------------------------


@router.get("/v1/audit", tags=["audit"])
def read_audit_log(
    context: Context,
    principal: Admin,
    after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Audit records with ``seq > after_seq``, oldest first, at most ``limit``."""
    rows = context.db.read(lambda reads: audit.records_after(reads, after_seq, limit))
    records = [AuditRecordOut.of(row) for row in rows]
    next_after = records[-1].seq if len(records) == limit else None
    return AuditPage(records=records, next_after_seq=next_after)


@router.get("/v1/audit/verify", tags=["audit"])
def verify_audit_log(context: Context, principal: Admin) -> ChainReportOut:
    """Walk the whole chain: ``ok`` is false if any record was edited, deleted or reordered."""
    with context.db.reading() as reads:
        report = audit.verify_chain(audit.all_records(reads))
    return ChainReportOut(
        ok=report.ok,
        records=report.records,
        problems=[ChainProblemOut(seq=p.seq, problem=p.problem) for p in report.problems],
    )
