"""TMK routes: the terminal registry (manufacturer, operator), the download steps (device
gateway), working keys and PIN-block checks (operator, i.e. the TMS), and the key server's
identity (admin; its certificates are public).

Routes parse, authorise, call the use cases (:mod:`~trustfleet.tmk.downloads`,
:mod:`~trustfleet.tmk.registry`, :mod:`~trustfleet.tmk.terminals`,
:mod:`~trustfleet.tmk.working_keys`, :mod:`~trustfleet.tmk.identity`) and serialise;
nothing else. The download steps take and return the protocol's canonical
JSON messages (``docs/tmk-protocol.md``) byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import partial
from typing import IO, Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.pinblock import PAN_PATTERN, PIN_PATTERN
from trustfleet.errors import InvalidInput, UnsupportedMediaType
from trustfleet.kit.routes import DeviceRoutes
from trustfleet.kit.sessions import SESSION_ID_PATTERN
from trustfleet.pki.x509 import RevocationReason
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, public, require_role
from trustfleet.server.devicelane import DeviceAnswer
from trustfleet.server.limits import streamed_import
from trustfleet.server.models import Role
from trustfleet.server.openapi import problem_responses
from trustfleet.server.paging import (
    DEFAULT_LIMIT,
    CursorParam,
    InvalidCursor,
    LimitParam,
    decode_cursor,
    encode_cursor,
)
from trustfleet.tmk import registry, services
from trustfleet.tmk.errors import TmkInvalidTerminalRecord
from trustfleet.tmk.identity import KSRCRT_CA, KeyServerIdentity
from trustfleet.tmk.terminals import TerminalOverview, TerminalSummary
from trustfleet.tmk.working_keys import WORKING_KEY_USAGES, IssuedWorkingKey

router = APIRouter(prefix="/v1/tmk", tags=["tmk"])

Context = Annotated[AppContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
Manufacturer = Annotated[Principal, Depends(require_role(Role.MANUFACTURER))]
Operator = Annotated[Principal, Depends(require_role(Role.OPERATOR))]
Reader = Annotated[Principal, Depends(require_role(Role.OPERATOR, Role.MANUFACTURER, Role.AUDITOR))]
IdentityReader = Annotated[
    Principal, Depends(require_role(Role.ADMIN, Role.OPERATOR, Role.AUDITOR))
]
Gateway = Annotated[Principal, Depends(require_role(Role.DEVICE_GATEWAY))]
Sn = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
SessionId = Annotated[str, Path(pattern=f"^{SESSION_ID_PATTERN.pattern}$")]

MAX_KEY_CHARS = 16_384
MAX_LINE_CHARS = 1_048_576
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024  # larger import bodies spill to a temporary file
READ_CHUNK_BYTES = 64 * 1024
IMPORT_MEDIA_TYPES = {
    "text/csv": "csv",
    "application/x-ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/json": "json",
}
#: a JSON import is an array of records; each is checked on its own (a bad one is rejected
#: in the report, with its code), so the document does not constrain the items
IMPORT_JSON_SCHEMA = {
    "type": "array",
    "items": {"description": "A terminal record: {sn, model, public_key}"},
}
CRL_PATH = f"/v1/ca/{KSRCRT_CA}/crl"
TERMINAL_LISTING = "tmk-terminals"


# =====================================================================================
# Models
# =====================================================================================


class TerminalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sn: str = Field(min_length=1, max_length=64)
    model: str = Field(default="", max_length=registry.MODEL_MAX)
    public_key: str = Field(
        min_length=1, max_length=MAX_KEY_CHARS, description="TKP_Pu: PEM or base64 DER SPKI"
    )


class TerminalOut(BaseModel):
    sn: str
    model: str
    key_algorithm: str
    status: str
    registered_by: str
    created_at: datetime
    updated_at: datetime


class TerminalPage(BaseModel):
    items: list[TerminalOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page")


class RejectionOut(BaseModel):
    row: int
    sn: str
    code: str
    message: str


class ImportReportOut(BaseModel):
    rows: int
    accepted: int
    unchanged: int
    rejected: list[RejectionOut]


class TmkOut(BaseModel):
    algorithm: str
    kcv: str
    status: str
    session_id: str
    created_at: datetime
    activated_at: datetime | None


class WorkingKeyInfoOut(BaseModel):
    usage: str
    algorithm: str
    key_version: str
    kcv: str
    created_at: datetime


class TerminalStatusOut(TerminalOut):
    tmk_algorithm: str
    rotation_requested: bool
    active_tmk: TmkOut | None
    working_keys: list[WorkingKeyInfoOut]
    tmk_history: int

    @classmethod
    def of(cls, view: TerminalOverview) -> TerminalStatusOut:
        tmk = view.active_tmk
        return cls(
            sn=view.sn,
            model=view.model,
            key_algorithm=view.key_algorithm,
            status=view.status,
            registered_by=view.registered_by,
            created_at=view.created_at,
            updated_at=view.updated_at,
            tmk_algorithm=view.tmk_algorithm,
            rotation_requested=view.rotation_requested,
            active_tmk=TmkOut(
                algorithm=tmk.algorithm,
                kcv=tmk.kcv,
                status=tmk.status,
                session_id=tmk.session_id,
                created_at=tmk.created_at,
                activated_at=tmk.activated_at,
            )
            if tmk
            else None,
            working_keys=[
                WorkingKeyInfoOut(
                    usage=k.usage,
                    algorithm=k.algorithm,
                    key_version=k.key_version,
                    kcv=k.kcv,
                    created_at=k.created_at,
                )
                for k in view.working_keys
            ],
            tmk_history=view.tmk_history,
        )


class StatusChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=200)


class RotationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["aes-128", "aes-256", "tdes"] | None = Field(
        default=None, description="The TMK algorithm of this and later downloads"
    )


class WorkingKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usage: Literal["P0", "M1", "M3", "D0"] = Field(
        description="TR-31 key usage: P0 PIN, M1/M3 ISO 9797-1 MAC 1/3, D0 data"
    )


class WorkingKeyOut(BaseModel):
    sn: str
    usage: str
    algorithm: str
    key_version: str
    key_block: str = Field(description="TR-31 key block under the terminal's TMK")
    kcv: str
    tmk_kcv: str
    issued_at: datetime

    @classmethod
    def of(cls, key: IssuedWorkingKey) -> WorkingKeyOut:
        return cls(
            sn=key.sn,
            usage=key.usage,
            algorithm=key.algorithm.value,
            key_version=key.key_version,
            key_block=key.key_block,
            kcv=key.kcv.hex().upper(),
            tmk_kcv=key.tmk_kcv.hex().upper(),
            issued_at=key.issued_at,
        )


class PinCheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pin_block: str = Field(pattern=r"^(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})$")
    pan: str = Field(pattern=PAN_PATTERN)
    pin: str = Field(pattern=PIN_PATTERN)


class PinCheckOut(BaseModel):
    match: bool


class AbortIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=64, description="The terminal's error code")
    ticket: str | None = Field(
        default=None,
        max_length=4096,
        description="The challenge's ticket (base64): needed before the proof was sent",
    )

    def ticket_bytes(self) -> bytes | None:
        if self.ticket is None:
            return None
        try:
            return base64.b64decode(self.ticket, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("ticket is not base64") from None


class ActivatedOut(BaseModel):
    status: Literal["active"] = "active"
    session_id: str
    sn: str
    algorithm: str
    kcv: str
    activated_at: datetime


class IdentityOut(BaseModel):
    ksrcrt_pem: str
    kswcrt_pem: str
    work_certificate_serial: str
    work_key_algorithm: str
    not_after: datetime
    crl_path: str

    @classmethod
    def of(cls, root_pem: str, identity: KeyServerIdentity) -> IdentityOut:
        return cls(
            ksrcrt_pem=root_pem,
            kswcrt_pem=identity.pem,
            work_certificate_serial=identity.serial_hex,
            work_key_algorithm=identity.algorithm.value,
            not_after=identity.certificate.not_valid_after_utc,
            crl_path=CRL_PATH,
        )


class IdentityRecordOut(BaseModel):
    work_certificate_serial: str
    work_key_algorithm: str
    status: str = Field(description="active, retired or revoked")
    created_at: datetime
    not_after: datetime

    @classmethod
    def of(cls, identity: KeyServerIdentity) -> IdentityRecordOut:
        return cls(
            work_certificate_serial=identity.serial_hex,
            work_key_algorithm=identity.algorithm.value,
            status=identity.status,
            created_at=identity.created_at,
            not_after=identity.certificate.not_valid_after_utc,
        )


class SweepOut(BaseModel):
    sessions_aborted: int
    keys_destroyed: int


class RevocationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: RevocationReason = RevocationReason.KEY_COMPROMISE


class RevokedOut(BaseModel):
    revoked_serial: str
    identity: IdentityOut


# =====================================================================================
# Downloads (terminals, through the device gateway): device routes, answered by the device
# lane in front of FastAPI (trustfleet.server.devicelane); the FastAPI routes below call the
# same handlers and document them.
# =====================================================================================

device = DeviceRoutes(router, roles={Role.DEVICE_GATEWAY.value})
_SESSION_PARAMS = {"session_id": SESSION_ID_PATTERN.pattern}


@device.post("/downloads")
def start_download(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """Step 1-2: a ``tmk-download-request`` in, a ``tmk-server-challenge`` out
    (docs/tmk-protocol.md)."""
    challenge = services.downloads(context).start(body, actor=principal.actor)
    return DeviceAnswer(challenge.to_json())


@device.post("/downloads/{session_id}/proof", params=_SESSION_PARAMS)
def download_proof(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """Step 4-6: a ``tmk-terminal-proof`` in, a ``tmk-key-delivery`` out."""
    delivery = services.downloads(context).accept_proof(
        params["session_id"], body, actor=principal.actor
    )
    return DeviceAnswer(delivery.to_json())


@device.post("/downloads/{session_id}/confirm", params=_SESSION_PARAMS, response_model=ActivatedOut)
def download_confirm(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """Step 7: a ``tmk-confirmation`` in; the TMK is active once this answers 200."""
    activation = services.downloads(context).confirm(
        params["session_id"], body, actor=principal.actor
    )
    out = ActivatedOut(
        session_id=activation.session_id,
        sn=activation.sn,
        algorithm=activation.algorithm.value,
        kcv=activation.kcv.hex().upper(),
        activated_at=activation.activated_at,
    )
    return DeviceAnswer(out.model_dump_json().encode())


device_routes = device.routes


@router.post("/downloads/{session_id}/abort")
def download_abort(
    session_id: SessionId, body: AbortIn, context: Context, principal: Gateway
) -> dict[str, str]:
    """The terminal gave up (and says why): the session ends and its TMK is destroyed. A
    session that has already ended answers 409 ``tmk-out-of-order``."""
    services.downloads(context).abort(
        session_id, body.code, actor=principal.actor, ticket=body.ticket_bytes()
    )
    return {"status": "aborted"}


@router.post("/sweep")
def sweep(context: Context, principal: Operator) -> SweepOut:
    """End expired downloads and destroy any key a crash left retired or aborted."""
    report = services.downloads(context).sweep(actor=principal.actor)
    return SweepOut(sessions_aborted=report.sessions_aborted, keys_destroyed=report.keys_destroyed)


# =====================================================================================
# Terminal registry
# =====================================================================================


def _terminal_out(view: TerminalOverview | TerminalSummary) -> TerminalOut:
    return TerminalOut(
        sn=view.sn,
        model=view.model,
        key_algorithm=view.key_algorithm,
        status=view.status,
        registered_by=view.registered_by,
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


@router.post("/terminals", status_code=201)
def register_terminal(body: TerminalIn, context: Context, principal: Manufacturer) -> TerminalOut:
    """Register one terminal (SN, model, TKP_Pu). Registering it again with the same key
    changes nothing; another key for a registered SN is
    ``tmk-terminal-already-registered``."""
    sn = registry.register_terminal(
        context.db, sn=body.sn, model=body.model, public_key=body.public_key, actor=principal.actor
    )
    return _terminal_out(services.terminals(context).overview(sn))


@router.post(
    "/terminals/import",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": IMPORT_JSON_SCHEMA if kind == "json" else {"type": "string"}}
                for media, kind in IMPORT_MEDIA_TYPES.items()
            },
        }
    },
)
@streamed_import
async def import_terminals(
    request: Request, context: Context, principal: Manufacturer
) -> ImportReportOut:
    """Bulk registration, streamed: CSV (header ``sn,model,public_key``), NDJSON (one
    object per line) or a JSON array, committed in batches of 1,000 rows; every row is
    accepted, unchanged (already registered with that key) or rejected with a code
    (docs/tmk.md)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    kind = IMPORT_MEDIA_TYPES.get(media)
    if kind is None:
        raise UnsupportedMediaType(
            f"unsupported content type {media[:60]!r}: use text/csv, application/x-ndjson"
            " or application/json"
        )
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as body:
        async for chunk in request.stream():
            body.write(chunk)
        body.seek(0)
        run = partial(_import, context, kind, body, principal.actor)
        report = await anyio.to_thread.run_sync(run)
    return ImportReportOut(**report.to_dict())


def _import(context: AppContext, kind: str, body: IO[bytes], actor: str) -> registry.ImportReport:
    """Runs in a worker thread over the spooled body. The body is received in full first:
    the import's write transaction must not wait on the event loop, which may itself be
    waiting for the database's write lock (see run_database_work)."""
    chunks = iter(partial(body.read, READ_CHUNK_BYTES), b"")
    lines = _lines(chunks, max_line=None if kind == "json" else MAX_LINE_CHARS)
    if kind == "csv":
        rows = registry.read_csv(lines)
    elif kind == "ndjson":
        rows = registry.read_ndjson(lines)
    else:
        rows = registry.read_json_array("".join(lines))
    return registry.import_terminals(context.db, rows, actor=actor)


def _lines(chunks: Iterator[bytes], *, max_line: int | None) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    while True:
        chunk = next(chunks, None)
        try:
            text = pending + decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError:
            raise TmkInvalidTerminalRecord("the body is not UTF-8 text") from None
        *complete, pending = text.split("\n")
        for line in complete:
            yield line + "\n"
        if max_line is not None and len(pending) > max_line:
            raise TmkInvalidTerminalRecord(f"a line is longer than {max_line} characters")
        if chunk is None:
            if pending:
                yield pending
            return


@router.get("/terminals")
def list_terminals(
    context: Context,
    principal: Reader,
    status: Annotated[Literal["active", "suspended", "revoked"] | None, Query()] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=registry.MODEL_MAX)] = None,
    cursor: CursorParam = None,
    limit: LimitParam = DEFAULT_LIMIT,
) -> TerminalPage:
    """Registered terminals in SN order, of ``status`` and ``model`` when given, one page at
    a time."""
    after = decode_cursor(TERMINAL_LISTING, cursor)
    if after is not None and not isinstance(after, str):
        raise InvalidCursor("the cursor is malformed")
    found = services.terminals(context).list_terminals(
        status=status, model=model, after_sn=after, limit=limit
    )
    next_cursor = encode_cursor(TERMINAL_LISTING, found[-1].sn) if len(found) == limit else None
    return TerminalPage(items=[_terminal_out(t) for t in found], next_cursor=next_cursor)


@router.get("/terminals/{sn}")
def get_terminal(sn: Sn, context: Context, principal: Reader) -> TerminalStatusOut:
    """The terminal's registration, status, active TMK and working keys (KCVs only)."""
    return TerminalStatusOut.of(services.terminals(context).overview(sn))


def _change(
    context: AppContext, sn: str, action: str, body: StatusChangeIn | None, actor: str
) -> TerminalStatusOut:
    reason = body.reason if body else ""
    view = services.terminals(context).change_status(sn, action, actor=actor, reason=reason)
    return TerminalStatusOut.of(view)


@router.post("/terminals/{sn}/suspend")
def suspend_terminal(
    sn: Sn, context: Context, principal: Operator, body: StatusChangeIn | None = None
) -> TerminalStatusOut:
    """Suspend: no downloads or working keys until re-activated; open downloads end."""
    return _change(context, sn, "suspend", body, principal.actor)


@router.post("/terminals/{sn}/revoke")
def revoke_terminal(
    sn: Sn, context: Context, principal: Operator, body: StatusChangeIn | None = None
) -> TerminalStatusOut:
    """Revoke for good: its TMK and working keys are retired and destroyed."""
    return _change(context, sn, "revoke", body, principal.actor)


@router.post("/terminals/{sn}/reactivate")
def reactivate_terminal(
    sn: Sn, context: Context, principal: Operator, body: StatusChangeIn | None = None
) -> TerminalStatusOut:
    """Re-activate a suspended terminal."""
    return _change(context, sn, "reactivate", body, principal.actor)


@router.post("/terminals/{sn}/rotate-tmk")
def rotate_tmk(
    sn: Sn, context: Context, principal: Operator, body: RotationIn | None = None
) -> TerminalStatusOut:
    """Allow the terminal's next download; when it completes, the current TMK and its
    working keys are retired and destroyed."""
    algorithm = KeyAlgorithm(body.algorithm) if body and body.algorithm else None
    view = services.terminals(context).request_rotation(
        sn, actor=principal.actor, algorithm=algorithm
    )
    return TerminalStatusOut.of(view)


# =====================================================================================
# Working keys and PIN blocks (the TMS)
# =====================================================================================


@router.post("/terminals/{sn}/working-keys", status_code=201)
def issue_working_key(
    sn: Sn, body: WorkingKeyIn, context: Context, principal: Operator
) -> WorkingKeyOut:
    """A new working key as a TR-31 block under the terminal's TMK (version D for AES
    TMKs, B for TDES); it replaces the terminal's previous key of that usage."""
    assert body.usage in WORKING_KEY_USAGES
    issued = services.working_keys(context).issue(sn, body.usage, actor=principal.actor)
    return WorkingKeyOut.of(issued)


@router.post("/terminals/{sn}/pin-blocks/verify")
def verify_pin_block(
    sn: Sn, body: PinCheckIn, context: Context, principal: Operator
) -> PinCheckOut:
    """Demo: does this PIN block (under the terminal's P0 key) carry this PIN? Answers
    only the verdict; every call is audited. See docs/tmk.md for why this is a demo."""
    match = services.working_keys(context).verify_pin_block(
        sn, bytes.fromhex(body.pin_block), pan=body.pan, pin=body.pin, actor=principal.actor
    )
    return PinCheckOut(match=match)


# =====================================================================================
# The key server's identity
# =====================================================================================


def _identity_out(context: AppContext, identity: KeyServerIdentity) -> IdentityOut:
    root = services.identity(context).root()
    return IdentityOut.of(root.pem, identity)


@router.get("/identity", dependencies=[Depends(public)], responses=problem_responses(404))
def get_identity(context: Context) -> IdentityOut:
    """KSRCRT (what terminals preload) and the current KSWCRT; public, as certificates
    are. KSRCRT's CRL is at ``crl_path`` (public too)."""
    return _identity_out(context, services.identity(context).require_current())


@router.get("/identity/history", responses=problem_responses(404))
def identity_history(context: Context, principal: IdentityReader) -> list[IdentityRecordOut]:
    """Every work certificate the key server has had, oldest first (404
    ``tmk-identity-not-initialised`` before the first)."""
    history = services.identity(context).history()
    if not history:
        services.identity(context).require_current()  # raises: nothing to show yet
    return [IdentityRecordOut.of(identity) for identity in history]


@router.post("/identity")
def init_identity(context: Context, principal: Admin) -> IdentityOut:
    """Make KSRCRT and the first work certificate if they do not exist yet."""
    identity = services.identity(context).ensure(actor=principal.actor)
    return _identity_out(context, identity)


@router.post("/identity/rotate-work-cert")
def rotate_work_certificate(context: Context, principal: Admin) -> IdentityOut:
    """A new work key and KSWCRT under the same KSRCRT; terminals need no change."""
    identity = services.identity(context).rotate(actor=principal.actor)
    return _identity_out(context, identity)


@router.post("/identity/revoke-work-cert")
def revoke_work_certificate(
    context: Context, principal: Admin, body: RevocationIn | None = None
) -> RevokedOut:
    """Revoke the current KSWCRT (KSRCRT's CRL lists it at once) and issue a new one."""
    reason = body.reason if body else RevocationReason.KEY_COMPROMISE
    revoked, new = services.identity(context).revoke(actor=principal.actor, reason=reason)
    return RevokedOut(revoked_serial=revoked.serial_hex, identity=_identity_out(context, new))
