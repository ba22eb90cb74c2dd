"""The key server's identity: the KSRCRT root CA every terminal trusts, and the work key with
its work certificate KSWCRT that signs each download challenge.

Both certificates come from :mod:`trustfleet.pki` (KSRCRT is the PKI's root CA
``tmk-ksrcrt``; KSWCRT a certificate it issues), and both private keys stay in the key store
(PKCS#11 when configured). Terminals hold only KSRCRT, so the work certificate can be
rotated without touching them; revoking it puts it on KSRCRT's CRL (served publicly at
``/v1/ca/tmk-ksrcrt/crl``), which terminals given that CRL honour.

One identity is active at a time, on every node: its row has ``active_slot = 1`` and the
column is unique, so two nodes that create or rotate at once cannot both win.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import bindparam, insert, select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import KeyNotFound, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.pki import x509 as px
from trustfleet.pki.errors import CaExists
from trustfleet.pki.service import SERVER_VALIDITY, CaInfo, PkiService
from trustfleet.pki.x509 import RevocationReason
from trustfleet.store import Database, IntegrityViolation
from trustfleet.tmk.errors import TmkIdentityNotInitialised
from trustfleet.tmk.models import ServerIdentity
from trustfleet.wire import as_utc, utcnow

KSRCRT_CA = "tmk-ksrcrt"
WORK_CERT_NAME = "tmk-key-server.trustfleet"
WORK_KEY_ALGORITHMS = frozenset(
    {KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072}
)
DEFAULT_WORK_KEY_ALGORITHM = KeyAlgorithm.EC_P256
_ACTIVE = 1


@dataclass(frozen=True)
class KeyServerIdentity:
    """A work key (key store handle) and its certificate; public facts only."""

    id: int
    work_key_handle: str
    algorithm: KeyAlgorithm
    kswcrt_der: bytes
    serial_hex: str
    status: str
    created_at: datetime
    #: the key store handle of the HMAC key sealing this identity's session tickets
    ticket_key_handle: str | None = None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.kswcrt_der)

    @property
    def pem(self) -> str:
        return px.to_pem(self.certificate)


def _identity(row: Any) -> KeyServerIdentity:
    return KeyServerIdentity(
        id=row.id,
        work_key_handle=row.work_key_handle,
        algorithm=KeyAlgorithm(row.algorithm),
        kswcrt_der=row.kswcrt_der,
        serial_hex=row.serial_hex,
        status=row.status,
        created_at=as_utc(row.created_at),
        ticket_key_handle=row.ticket_key_handle,
    )


_COLUMNS = (
    ServerIdentity.id,
    ServerIdentity.work_key_handle,
    ServerIdentity.algorithm,
    ServerIdentity.kswcrt_der,
    ServerIdentity.serial_hex,
    ServerIdentity.status,
    ServerIdentity.created_at,
    ServerIdentity.ticket_key_handle,
)
_ACTIVE_IDENTITY = select(*_COLUMNS).where(ServerIdentity.active_slot == _ACTIVE)
_ACTIVE_IDENTITY_LOCKED = _ACTIVE_IDENTITY.with_for_update()
_HISTORY = select(*_COLUMNS).order_by(ServerIdentity.id)
_ADD_TICKET_KEY = (
    update(ServerIdentity)
    .where(ServerIdentity.id == bindparam("b_id"), ServerIdentity.ticket_key_handle.is_(None))
    .values(ticket_key_handle=bindparam("handle"))
)
_END_IDENTITY = (
    update(ServerIdentity)
    .where(ServerIdentity.id == bindparam("b_id"))
    .values(active_slot=None, status=bindparam("status"), retired_at=bindparam("b_now"))
)


class IdentityService:
    """Create, read, rotate and revoke the key server's identity."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        pki: PkiService,
        *,
        clock: Callable[[], datetime] = utcnow,
        work_cert_validity: timedelta = SERVER_VALIDITY,
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock
        self._validity = work_cert_validity
        self._pki = pki

    # -- reading ---------------------------------------------------------------------------

    def current(self) -> KeyServerIdentity | None:
        """The active identity, or None before the first one is made."""
        with self._db.reading() as reads:
            row = reads.one(_ACTIVE_IDENTITY)
        return _identity(row) if row else None

    def require_current(self) -> KeyServerIdentity:
        found = self.current()
        if found is None:
            raise TmkIdentityNotInitialised(
                "no work certificate yet: run `trustfleet tmk identity init` or start a download"
            )
        return found

    def history(self) -> list[KeyServerIdentity]:
        with self._db.reading() as reads:
            return [_identity(row) for row in reads.all(_HISTORY)]

    def root(self) -> CaInfo:
        """KSRCRT, created on first use."""
        existing = self._pki.find_ca(KSRCRT_CA)
        if existing is not None:
            return existing
        try:
            return self._pki.create_root_ca(
                KSRCRT_CA,
                KeyAlgorithm.EC_P256,
                path_length=0,
                actor="tmk-identity",
                restricted=True,  # it issues only work certificates, for keys held here
            )
        except CaExists:  # another node made it at the same time
            return self._pki.get_ca(KSRCRT_CA)

    def crl(self, *, actor: str = "tmk-identity") -> bytes:
        """KSRCRT's current CRL (DER): revoked work certificates."""
        return self._pki.crl(KSRCRT_CA, actor=actor)

    # -- changing --------------------------------------------------------------------------

    def ensure(
        self, *, actor: str, algorithm: KeyAlgorithm = DEFAULT_WORK_KEY_ALGORITHM
    ) -> KeyServerIdentity:
        """The active identity; KSRCRT and a first work certificate are made if missing, and
        a ticket key if the identity predates them (migration tmk_0003)."""
        current = self.current() or self._install(actor=actor, algorithm=algorithm, replace=False)
        if current.ticket_key_handle is None:
            return self._add_ticket_key(current)
        return current

    def _new_ticket_key(self) -> str:
        return self._keystore.generate(
            KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC, label="tmk-ticket-key"
        ).handle

    def _add_ticket_key(self, identity: KeyServerIdentity) -> KeyServerIdentity:
        handle = self._new_ticket_key()
        with self._db.work() as uow:
            added = uow.run(_ADD_TICKET_KEY, b_id=identity.id, handle=handle)
        if not added:  # another node added one first
            self._destroy_quietly(handle)
        return self.require_current()

    def rotate(
        self, *, actor: str, algorithm: KeyAlgorithm = DEFAULT_WORK_KEY_ALGORITHM
    ) -> KeyServerIdentity:
        """A new work key and certificate under the same KSRCRT; the old one is retired and
        its key destroyed. Terminals need no change: they trust only KSRCRT."""
        return self._install(actor=actor, algorithm=algorithm, replace=True)

    def revoke(
        self,
        *,
        actor: str,
        reason: RevocationReason | str = RevocationReason.KEY_COMPROMISE,
        algorithm: KeyAlgorithm = DEFAULT_WORK_KEY_ALGORITHM,
    ) -> tuple[KeyServerIdentity, KeyServerIdentity]:
        """Revoke the active work certificate (KSRCRT's next CRL lists it) and put a new one
        in its place. Returns (revoked, new)."""
        old = self.require_current()
        self._pki.revoke(old.serial_hex, reason, actor=actor)
        new = self._install(actor=actor, algorithm=algorithm, replace=True, revoked=old.id)
        revoked = next(i for i in self.history() if i.id == old.id)
        return revoked, new

    def _install(
        self, *, actor: str, algorithm: KeyAlgorithm, replace: bool, revoked: int | None = None
    ) -> KeyServerIdentity:
        if algorithm not in WORK_KEY_ALGORITHMS:
            allowed = ", ".join(sorted(a.value for a in WORK_KEY_ALGORITHMS))
            raise UnsupportedAlgorithm(f"a work key is one of {allowed}")
        self.root()
        handle = self._keystore.generate(algorithm, KeyUsage.SIGN, label="tmk-work-key").handle
        ticket_key = self._new_ticket_key()
        try:
            cert = self._pki.issue_server_certificate_for_held_key(
                KSRCRT_CA,
                handle,
                dns_names=[WORK_CERT_NAME],
                validity=self._validity,
                actor=actor,
            )
        except BaseException:
            self._keystore.destroy(handle)
            self._keystore.destroy(ticket_key)
            raise
        try:
            installed, old_handles = self._store(
                (handle, ticket_key),
                algorithm,
                cert.der,
                cert.serial_hex,
                actor=actor,
                replace=replace,
                revoked=revoked,
            )
        except BaseException:
            self._discard((handle, ticket_key), cert.serial_hex, actor)
            raise
        if installed.work_key_handle != handle:  # another node installed one first
            self._discard((handle, ticket_key), cert.serial_hex, actor)
        for old_handle in old_handles:
            self._destroy_quietly(old_handle)
        return installed

    def _store(
        self,
        handles: tuple[str, str],
        algorithm: KeyAlgorithm,
        der: bytes,
        serial_hex: str,
        *,
        actor: str,
        replace: bool,
        revoked: int | None,
    ) -> tuple[KeyServerIdentity, list[str]]:
        """Install the new identity (work key and ticket key ``handles``); the keys of the
        one it replaces that are to be destroyed: the work key, and the ticket key too if
        it is revoked (a retired one's tickets live out their minute)."""
        now = as_utc(self._clock())
        try:
            with self._db.work() as uow:
                current = uow.one(_ACTIVE_IDENTITY_LOCKED)
                if current is not None and not replace:
                    return _identity(current), []
                old_handles = []
                ended_status = None
                if current is not None:
                    ended_status = "revoked" if current.id == revoked else "retired"
                    # frees the active slot before the new row takes it
                    uow.run(_END_IDENTITY, b_id=current.id, status=ended_status, b_now=now)
                    old_handles.append(current.work_key_handle)
                    if ended_status == "revoked" and current.ticket_key_handle:
                        old_handles.append(current.ticket_key_handle)
                new_id = uow.scalar(
                    insert(ServerIdentity)
                    .values(
                        work_key_handle=handles[0],
                        ticket_key_handle=handles[1],
                        algorithm=algorithm.value,
                        kswcrt_der=der,
                        serial_hex=serial_hex,
                        status="active",
                        active_slot=_ACTIVE,
                        created_at=now,
                    )
                    .returning(ServerIdentity.id)
                )
                uow.audit(
                    "tmk.work_certificate_installed",
                    actor=actor,
                    subject=serial_hex,
                    details={
                        "algorithm": algorithm.value,
                        "replaced": current.serial_hex if current is not None else None,
                        "replaced_status": ended_status,
                    },
                )
            installed = KeyServerIdentity(
                id=new_id,
                work_key_handle=handles[0],
                algorithm=algorithm,
                kswcrt_der=der,
                serial_hex=serial_hex,
                status="active",
                created_at=now,
                ticket_key_handle=handles[1],
            )
            return installed, old_handles
        except IntegrityViolation:  # another node took the active slot between read and write
            return self.require_current(), []

    def _discard(self, handles: tuple[str, str], serial_hex: str, actor: str) -> None:
        """An issued work certificate that never became active: revoke it, drop its keys."""
        for handle in handles:
            self._destroy_quietly(handle)
        self._pki.revoke(serial_hex, RevocationReason.SUPERSEDED, actor=actor)

    def _destroy_quietly(self, handle: str) -> None:
        with contextlib.suppress(KeyNotFound):
            self._keystore.destroy(handle)
