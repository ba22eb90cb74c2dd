"""PKI routes: list CAs, fetch a CRL (public), issue and revoke certificates (admin)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal, Self

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trustfleet.pki.service import (
    DEVICE_VALIDITY,
    SERVER_VALIDITY,
    CaInfo,
    CertificateInfo,
    PkiService,
)
from trustfleet.pki.x509 import RevocationReason
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, public, require_role
from trustfleet.server.models import Role

router = APIRouter(prefix="/v1/ca", tags=["pki"])

Context = Annotated[AppContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
Reader = Annotated[Principal, Depends(require_role(Role.ADMIN, Role.OPERATOR, Role.AUDITOR))]
CaName = Annotated[str, Path(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$")]

CRL_MEDIA_TYPE = "application/pkix-crl"
MAX_PEM_CHARS = 16_384
MAX_NAMES = 100
MAX_VALIDITY_DAYS = 3650


class CaOut(BaseModel):
    name: str
    algorithm: str
    parent: str | None
    path_length: int
    restricted: bool = Field(
        description="Issues nothing through /v1/ca/{name}/issue (403 ca-restricted): only its"
        " owner's certificates for keys the key store holds (the TMK key server's root)"
    )
    serial: str
    subject: str = Field(description="The certificate's subject (RFC 4514)")
    not_before: datetime
    not_after: datetime
    certificate_pem: str

    @classmethod
    def of(cls, ca: CaInfo) -> CaOut:
        cert = ca.certificate
        return cls(
            name=ca.name,
            algorithm=ca.algorithm.value,
            parent=ca.parent,
            path_length=ca.path_length,
            restricted=ca.restricted,
            serial=ca.serial_hex,
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_pem=ca.pem,
        )


class IssueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["server", "device"]
    csr_pem: str | None = Field(default=None, max_length=MAX_PEM_CHARS)
    public_key_pem: str | None = Field(default=None, max_length=MAX_PEM_CHARS)
    dns_names: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=MAX_NAMES
    )
    ips: list[Annotated[str, Field(min_length=2, max_length=45)]] = Field(
        default_factory=list, max_length=MAX_NAMES
    )
    device_id: str | None = Field(default=None, min_length=1, max_length=64)
    validity_days: int | None = Field(default=None, ge=1, le=MAX_VALIDITY_DAYS)

    @model_validator(mode="after")
    def _fits_kind(self) -> Self:
        if (self.csr_pem is None) == (self.public_key_pem is None):
            raise ValueError("give exactly one of csr_pem and public_key_pem")
        if self.kind == "device" and (self.device_id is None or self.dns_names or self.ips):
            raise ValueError("a device certificate takes a device_id and no dns_names or ips")
        if self.kind == "server" and (self.device_id is not None or not self.dns_names + self.ips):
            raise ValueError("a server certificate takes dns_names and/or ips, no device_id")
        return self


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serial: str = Field(min_length=1, max_length=64, description="Hexadecimal serial number")
    reason: RevocationReason = RevocationReason.UNSPECIFIED


class CertificateOut(BaseModel):
    serial: str
    kind: str
    issuer: str
    subject: str
    not_before: datetime
    not_after: datetime
    status: str
    revoked_at: datetime | None
    revocation_reason: str | None
    certificate_pem: str

    @classmethod
    def of(cls, info: CertificateInfo) -> CertificateOut:
        return cls(
            serial=info.serial_hex,
            kind=info.kind.value,
            issuer=info.issuer,
            subject=info.subject,
            not_before=info.not_before,
            not_after=info.not_after,
            status=info.status,
            revoked_at=info.revoked_at,
            revocation_reason=info.revocation_reason.value if info.revocation_reason else None,
            certificate_pem=info.pem,
        )


class IssuedOut(CertificateOut):
    chain_pem: list[str] = Field(description="The issuing CA's certificate and its parents")


def _service(context: AppContext) -> PkiService:
    return PkiService(context.db, context.keystore)


@router.get("")
def list_cas(context: Context, principal: Reader) -> list[CaOut]:
    """Every certificate authority with its certificate."""
    return [CaOut.of(ca) for ca in _service(context).list_cas()]


@router.get(
    "/{name}/crl",
    dependencies=[Depends(public)],
    response_class=Response,
    responses={200: {"content": {CRL_MEDIA_TYPE: {}}, "description": "DER-encoded CRL"}},
)
def get_crl(name: CaName, context: Context) -> Response:
    """The CA's current CRL (DER). Public: relying parties fetch it without a token."""
    der = _service(context).crl(name, actor="crl-endpoint")
    return Response(
        content=der, media_type=CRL_MEDIA_TYPE, headers={"Cache-Control": "public, max-age=300"}
    )


@router.post("/{name}/issue", status_code=201)
def issue_certificate(
    name: CaName, body: IssueRequest, context: Context, principal: Admin
) -> IssuedOut:
    """Issue a server (serverAuth) or device (clientAuth) certificate under CA ``name``.
    The key comes from the CSR (whose signature must verify) or the public key; names
    and the device id come from this request, never from the CSR. A restricted CA (the
    TMK key server's root ``tmk-ksrcrt``) refuses: 403 ``ca-restricted``."""
    service = _service(context)
    public_key = body.public_key_pem.encode() if body.public_key_pem else None
    csr = body.csr_pem.encode() if body.csr_pem else None
    if body.kind == "server":
        validity = timedelta(days=body.validity_days) if body.validity_days else SERVER_VALIDITY
        info = service.issue_server_certificate(
            name,
            dns_names=body.dns_names,
            ips=body.ips,
            validity=validity,
            actor=principal.actor,
            public_key=public_key,
            csr=csr,
        )
    else:
        assert body.device_id is not None  # checked by IssueRequest
        validity = timedelta(days=body.validity_days) if body.validity_days else DEVICE_VALIDITY
        info = service.issue_device_certificate(
            name,
            body.device_id,
            validity=validity,
            actor=principal.actor,
            public_key=public_key,
            csr=csr,
        )
    chain = [ca.pem for ca in service.ca_chain(name)]
    return IssuedOut(**CertificateOut.of(info).model_dump(), chain_pem=chain)


@router.post("/revoke")
def revoke_certificate(body: RevokeRequest, context: Context, principal: Admin) -> CertificateOut:
    """Revoke a certificate by serial; its CA's next CRL (fetched at once) lists it."""
    info = _service(context).revoke(body.serial, body.reason, actor=principal.actor)
    return CertificateOut.of(info)
