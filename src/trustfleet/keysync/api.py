"""Key-sync routes: manufacturer imports, service registration (operator), platforms,
gateways and manifest signing keys (admin), the SMS gateways' inbound webhook (signed by the
gateway, no token) and the device gateways' key-sync requests (a device route).

Routes parse, authorise, call the use cases and serialise; nothing else.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from functools import partial
from typing import IO, Annotated, Literal
from urllib.parse import parse_qsl

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from trustfleet.keysync import imports as imports_module
from trustfleet.keysync import protocol, services
from trustfleet.keysync.errors import KeysyncUnknownFormat
from trustfleet.keysync.imports import ImportReport, text_lines
from trustfleet.keysync.registration import (
    SubscriberView,
    destination_of,
    register_gateway,
    register_manufacturer_key,
)
from trustfleet.kit.outbox import Outbox
from trustfleet.kit.outbox.api import DestinationOut, MessageOut
from trustfleet.kit.routes import DeviceRoutes
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, require_role
from trustfleet.server.devicelane import CLIENT_PARAM, DeviceAnswer
from trustfleet.server.limits import streamed_import
from trustfleet.server.models import Role
from trustfleet.store import MAX_INTEGER

router = APIRouter(prefix="/v1/keysync", tags=["keysync"])

Context = Annotated[AppContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
Manufacturer = Annotated[Principal, Depends(require_role(Role.MANUFACTURER))]
ImportReader = Annotated[Principal, Depends(require_role(Role.MANUFACTURER, Role.OPERATOR))]
Operator = Annotated[Principal, Depends(require_role(Role.OPERATOR))]
Staff = Annotated[Principal, Depends(require_role(Role.ADMIN, Role.OPERATOR))]
ImportId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
AppId = Annotated[str, Path(pattern=f"^{protocol.ID_PATTERN.pattern}$")]
Mdn = Annotated[str, Path(pattern=r"^\+?[0-9]{7,15}$")]
GATEWAY_PATTERN = r"[a-z0-9][a-z0-9-]{0,63}"
GatewayName = Annotated[str, Path(pattern=f"^{GATEWAY_PATTERN}$")]

SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
#: the largest row number a query may name (rows are numbered in an Integer column)
MAX_ROW = MAX_INTEGER
IMPORT_MEDIA_TYPES = {
    "text/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-keysync-manifest": "manifest",
}
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


# =====================================================================================
# Models
# =====================================================================================


class RejectionOut(BaseModel):
    row: int
    terminal_id: str
    key_id: str
    code: str
    message: str


class ImportOut(BaseModel):
    id: str
    format: str
    status: Literal["running", "completed"]
    rows_done: int
    accepted: int
    unchanged: int
    rejected: int
    rejections: list[RejectionOut] = Field(description="The first rejected rows")

    @classmethod
    def of(cls, report: ImportReport) -> ImportOut:
        return cls.model_validate(report.to_dict())


class ManufacturerKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kid: str = Field(min_length=1, max_length=64)
    manufacturer: str = Field(min_length=1, max_length=200)
    public_key_pem: str = Field(min_length=1, max_length=4096)


class RegistrationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mdn: str = Field(min_length=1, max_length=32, description="E.164, e.g. +8614400000001")
    application_ids: list[str] = Field(min_length=1, max_length=32)
    terminal_id: str | None = Field(default=None, max_length=64)


class SubscriberOut(BaseModel):
    mdn: str
    terminal_id: str | None
    application_ids: list[str]
    bindings: list[dict[str, str]]

    @classmethod
    def of(cls, view: SubscriberView) -> SubscriberOut:
        return cls(
            mdn=view.mdn,
            terminal_id=view.terminal_id,
            application_ids=view.application_ids,
            bindings=[{k: str(v) for k, v in b.items()} for b in view.bindings],
        )


class PlatformIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, description="The platform's webhook URL")
    hpke_public_key_pem: str = Field(min_length=1, max_length=4096)
    signing: Literal["v1", "v1a"] = Field(
        default="v1a", description="Standard Webhooks v1 (HMAC-SHA256) or v1a (Ed25519)"
    )
    secret: str | None = Field(
        default=None, max_length=200, description="v1 only: a whsec_ secret to use"
    )


class PlatformOut(BaseModel):
    application_id: str
    url: str
    signing: str
    hpke: str
    destination: str
    verifier: str | None = Field(
        default=None,
        description="What the platform verifies with: whpk_ (v1a), or whsec_ (v1, shown once)",
    )


class GatewayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook_url: str = Field(
        min_length=1, max_length=2000, description="This webhook's URL as the gateway calls it"
    )
    secret: str = Field(min_length=1, max_length=200, description="The gateway's auth token")
    reply_url: str | None = Field(default=None, max_length=2000)
    reply_account: str | None = Field(default=None, max_length=100)
    reply_from: str | None = Field(default=None, max_length=20)


class SyncRequestIn(BaseModel):
    """What a device gateway sends for an IP-connected terminal (as canonical JSON)."""

    type: Literal["keysync-sync-request"] = "keysync-sync-request"
    v: Literal[1] = 1
    mdn: str
    request: str = Field(description="The request line, as in an SMS body")


class BoundOut(BaseModel):
    status: Literal["bound"] = "bound"
    mdn: str
    key_id: str
    application_id: str
    delivery_id: str


# =====================================================================================
# Imports (manufacturers)
# =====================================================================================


@router.put(
    "/imports/{import_id}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"type": "string"}} for media in IMPORT_MEDIA_TYPES},
        }
    },
)
@streamed_import
async def put_import(
    import_id: ImportId, request: Request, context: Context, principal: Manufacturer
) -> ImportOut:
    """Import terminal keys: CSV (``terminal_id,key_id,key,application_id,label,algorithm``,
    key in hex), JSON Lines (same fields) or a signed manifest (one JWS per line). Committed
    in batches; sending the same content under the same ID again resumes an import cut
    short, or answers the finished import's report (it changes nothing)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    kind = IMPORT_MEDIA_TYPES.get(media)
    if kind is None:
        raise KeysyncUnknownFormat(
            f"unsupported content type {media[:60]!r}: use text/csv, application/x-ndjson"
            " or application/x-keysync-manifest"
        )
    digest = hashlib.sha256()
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as body:
        async for chunk in request.stream():
            digest.update(chunk)
            body.write(chunk)
        body.seek(0)
        run = partial(_import, context, import_id, kind, body, digest.hexdigest(), principal)
        report = await anyio.to_thread.run_sync(run)
    return ImportOut.of(report)


def _import(
    context: AppContext,
    import_id: str,
    kind: str,
    body: IO[bytes],
    digest: str,
    principal: Principal,
) -> ImportReport:
    """In a worker thread, over the whole spooled body: a write transaction never waits on
    the event loop (docs/architecture.md)."""
    return services.imports(context).run(
        import_id, kind, text_lines(body), content_sha256=digest, actor=principal.actor
    )


@router.get("/imports/{import_id}")
def get_import(import_id: ImportId, context: Context, principal: ImportReader) -> ImportOut:
    """An import's progress (``rows_done``) and counts, with its first rejected rows."""
    return ImportOut.of(services.imports(context).report(import_id))


@router.get("/imports/{import_id}/rejections")
def get_rejections(
    import_id: ImportId,
    context: Context,
    principal: ImportReader,
    after_row: Annotated[int, Query(ge=0, le=MAX_ROW)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[RejectionOut]:
    """Rejected rows after ``after_row``, in row order (page through them)."""
    found = services.imports(context).rejections(import_id, after_row=after_row, limit=limit)
    return [RejectionOut(**imports_module.rejection_dict(r)) for r in found]


@router.get("/import-key")
def get_import_key(context: Context, principal: ImportReader) -> dict[str, str]:
    """The X25519 public key manifests seal key values to (PEM)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = services.vault(context).import_public_key()
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    return {"algorithm": "x25519", "hpke": "DHKEM(X25519)/HKDF-SHA256/ChaCha20-Poly1305",
            "public_key_pem": pem}  # fmt: skip


@router.post("/manufacturer-keys", status_code=201)
def post_manufacturer_key(
    body: ManufacturerKeyIn, context: Context, principal: Admin
) -> dict[str, str]:
    """Register a manufacturer's manifest signing key (Ed25519 or P-256) under its kid."""
    algorithm = register_manufacturer_key(
        context.db, kid=body.kid, manufacturer=body.manufacturer,
        public_key_pem=body.public_key_pem, actor=principal.actor,
    )  # fmt: skip
    return {"kid": body.kid, "algorithm": algorithm}


# =====================================================================================
# Service registration (operators)
# =====================================================================================


@router.post("/registrations")
def post_registration(body: RegistrationIn, context: Context, principal: Operator) -> SubscriberOut:
    """Register an MDN for one or more application IDs (again: no change)."""
    view = services.registrations(context).register(
        body.mdn, body.application_ids, actor=principal.actor, terminal_id=body.terminal_id
    )
    return SubscriberOut.of(view)


@router.get("/registrations/{mdn}")
def get_registration(mdn: Mdn, context: Context, principal: Operator) -> SubscriberOut:
    """An MDN's applications, terminal and active bindings."""
    return SubscriberOut.of(services.registrations(context).view(_plus(mdn)))


@router.delete("/registrations/{mdn}")
def delete_registration(
    mdn: Mdn,
    context: Context,
    principal: Operator,
    application_id: Annotated[str | None, Query(max_length=32)] = None,
) -> SubscriberOut:
    """Remove one application's registration, or every one and the MDN's terminal."""
    view = services.registrations(context).deregister(
        _plus(mdn), application_id, actor=principal.actor
    )
    return SubscriberOut.of(view)


def _plus(mdn: str) -> str:
    return mdn if mdn.startswith("+") else "+" + mdn


# =====================================================================================
# Platforms and gateways (admin)
# =====================================================================================


@router.put("/platforms/{application_id}")
def put_platform(
    application_id: AppId, body: PlatformIn, context: Context, principal: Admin
) -> PlatformOut:
    """Register (or replace) the platform of an application: its webhook URL, HPKE public
    key (X25519 or P-256) and signing. A new signing key is made: give the platform the
    answer's ``verifier``."""
    from trustfleet.kit.outbox.webhooks import decode_secret

    secret = decode_secret(body.secret) if body.secret is not None else None
    view = services.platforms(context).register(
        application_id, url=body.url, hpke_public_key_pem=body.hpke_public_key_pem,
        signing=body.signing, actor=principal.actor, secret=secret,
    )  # fmt: skip
    return PlatformOut(**view.__dict__)


@router.get("/platforms")
def list_platforms(context: Context, principal: Staff) -> list[PlatformOut]:
    return [PlatformOut(**view.__dict__) for view in services.platforms(context).list()]


@router.get("/platforms/{application_id}/deliveries")
def platform_deliveries(
    application_id: AppId,
    context: Context,
    principal: Staff,
    status: Literal["pending", "delivered", "dead"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[MessageOut]:
    """The platform's deliveries, newest first."""
    views = Outbox(context.db).messages(
        status=status, destination=destination_of(application_id), limit=limit
    )
    return [MessageOut.of(view) for view in views]


@router.post("/platforms/{application_id}/pause")
def pause_platform(application_id: AppId, context: Context, principal: Staff) -> DestinationOut:
    """No deliveries to this platform until resumed (they wait; nothing is lost)."""
    view = Outbox(context.db).set_paused(
        destination_of(application_id), True, actor=principal.actor
    )
    return DestinationOut.of(view)


@router.post("/platforms/{application_id}/resume")
def resume_platform(application_id: AppId, context: Context, principal: Staff) -> DestinationOut:
    view = Outbox(context.db).set_paused(
        destination_of(application_id), False, actor=principal.actor
    )
    return DestinationOut.of(view)


@router.put("/gateways/{name}")
def put_gateway(
    name: GatewayName, body: GatewayIn, context: Context, principal: Admin
) -> dict[str, object]:
    """Register (or replace) an SMS gateway: the URL it calls this webhook at, its signing
    secret (kept sealed by the key store) and optionally its outbound API for replies."""
    register_gateway(
        context.db, services.vault(context), name=name, webhook_url=body.webhook_url,
        secret=body.secret, actor=principal.actor, reply_url=body.reply_url,
        reply_account=body.reply_account, reply_from=body.reply_from,
    )  # fmt: skip
    return {"name": name, "webhook_url": body.webhook_url, "replies": body.reply_url is not None}


# =====================================================================================
# Key-sync requests: SMS gateways (signed webhook) and device gateways (device route)
# =====================================================================================


device = DeviceRoutes(router, roles={Role.DEVICE_GATEWAY.value})


@device.post("/sync-requests", response_model=BoundOut)
def sync_request(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """A key-sync request of an IP-connected terminal, the MDN asserted by the device
    gateway: ``{"type": "keysync-sync-request", "v": 1, "mdn": ..., "request": "KS1 ..."}``."""
    fields = protocol.CODEC.fields(body, "keysync-sync-request")
    mdn, line = fields.text("mdn"), fields.text("request")
    fields.done()
    bound = services.key_sync(context).request(
        mdn=mdn, body=line, via="http", actor=principal.actor
    )
    out = BoundOut(
        mdn=bound.mdn,
        key_id=bound.key_id,
        application_id=bound.application_id,
        delivery_id=bound.delivery_id,
    )
    return DeviceAnswer(out.model_dump_json().encode())


@device.post(
    "/sms/{gateway}",
    params={"gateway": GATEWAY_PATTERN},
    public=True,
    headers={"signature": "X-Twilio-Signature"},
    problems=(403,),  # an unknown gateway, a bad signature, an unregistered MDN
    request_media_type="application/x-www-form-urlencoded",
    response_media_type="text/xml",
)
def inbound_sms(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """An SMS gateway's inbound-message webhook (Twilio's form fields ``From``, ``To``,
    ``Body``, ``MessageSid``...), authenticated by its ``X-Twilio-Signature`` (no API
    token). The MDN is ``From``; the body is a key-sync request
    (docs/keysync-protocol.md). Answers empty TwiML; a refusal, problem+json with its code."""
    form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    signature = params.get("signature") or None
    client = params.get(CLIENT_PARAM, "")
    services.key_sync(context).sms(params["gateway"], form, signature, client=client)
    return DeviceAnswer(TWIML_EMPTY, media_type="text/xml")


device_routes = device.routes
