"""Operator and admin use cases: service registration (MDN <-> application IDs), the
manufacturers' manifest signing keys, the application platforms and the SMS gateways."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import phonenumbers
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import bindparam, delete, select, update

from trustfleet.crypto import load_public_key, public_key_to_der
from trustfleet.errors import Conflict, CryptoError
from trustfleet.keystore.base import KeyStore
from trustfleet.keysync import protocol
from trustfleet.keysync.errors import (
    KeysyncError,
    KeysyncInvalidMdn,
    KeysyncInvalidRecord,
    KeysyncNotFound,
)
from trustfleet.keysync.models import (
    Binding,
    Gateway,
    ManufacturerKey,
    Platform,
    Registration,
    Subscriber,
)
from trustfleet.keysync.vault import Vault
from trustfleet.kit import outbox
from trustfleet.store import Database, IntegrityViolation
from trustfleet.wire import transcript, utcnow

_GATEWAY_SECRET_LABEL = b"trustfleet keysync gateway secret v1"
GATEWAY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
KID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
DESTINATION_PREFIX = "keysync:"


class KeysyncRegistrationConflict(KeysyncError, Conflict):
    code = "keysync-registration-conflict"
    status = 409
    title = "The MDN or the terminal is already bound to another"


# -- MDNs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class M2mRange:
    """Numbers ``prefix`` + exactly ``digits`` more digits are accepted as M2M MDNs."""

    prefix: str
    digits: int

    def matches(self, e164: str) -> bool:
        return e164.startswith(self.prefix) and len(e164) - len(self.prefix) == self.digits


def parse_ranges(text: str) -> tuple[M2mRange, ...]:
    """``"+86:13,+4915:11"`` -> ranges; ValueError if malformed."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        prefix, _, digits = part.partition(":")
        if not re.fullmatch(r"\+[1-9][0-9]{0,5}", prefix) or not digits.isdigit():
            raise ValueError(f"an M2M range is +<prefix>:<digits>, not {part!r}")
        ranges.append(M2mRange(prefix, int(digits)))
    return tuple(ranges)


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_SEPARATORS = re.compile(r"[\s().-]")


def e164_form(text: str) -> str:
    """The ``+<digits>`` form of a number written with spaces, dots, dashes or brackets
    (or ``00`` for ``+``); KeysyncInvalidMdn when it is not one."""
    compact = _SEPARATORS.sub("", text.strip())
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if not _E164.fullmatch(compact):
        raise KeysyncInvalidMdn("an MDN is an international number: + and 7-15 digits")
    return compact


def normalise_mdn(text: str, ranges: Sequence[M2mRange]) -> str:
    """The E.164 form of an acceptable MDN: a number libphonenumber holds valid, or one of
    the configured M2M ranges (libphonenumber rejects many real M2M numbers)."""
    compact = e164_form(text)
    if any(r.matches(compact) for r in ranges):
        return compact
    try:
        number = phonenumbers.parse(compact, None)
    except phonenumbers.NumberParseException:
        raise KeysyncInvalidMdn("the MDN is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise KeysyncInvalidMdn("the MDN is not a valid number nor in an M2M range")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# -- registrations -------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberView:
    mdn: str
    terminal_id: str | None
    application_ids: list[str]
    bindings: list[dict[str, object]]


_SUBSCRIBER = select(Subscriber.mdn, Subscriber.terminal_id).where(
    Subscriber.mdn == bindparam("b_mdn")
)


class Registrations:
    def __init__(
        self,
        db: Database,
        *,
        ranges: Sequence[M2mRange],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._ranges = tuple(ranges)
        self._clock = clock

    def normalise(self, mdn: str) -> str:
        return normalise_mdn(mdn, self._ranges)

    def register(
        self,
        mdn: str,
        application_ids: Sequence[str],
        *,
        actor: str,
        terminal_id: str | None = None,
    ) -> SubscriberView:
        """Register ``mdn`` for each application (again: no change). ``terminal_id`` binds
        the MDN to that terminal now (else its first key sync does)."""
        number = self.normalise(mdn)
        if not application_ids:
            raise KeysyncInvalidRecord("register at least one application ID")
        for app in application_ids:
            if not protocol.ID_PATTERN.fullmatch(app):
                raise KeysyncInvalidRecord(f"application IDs are {protocol.ID_RULE}")
        if terminal_id is not None and not protocol.TERMINAL_ID_PATTERN.fullmatch(terminal_id):
            raise KeysyncInvalidRecord(f"terminal IDs are {protocol.TERMINAL_ID_RULE}")
        now = self._clock()
        try:
            with self._db.work() as uow:
                current = uow.one(_SUBSCRIBER.with_for_update(), b_mdn=number)
                if current is None:
                    uow.insert(
                        Subscriber, mdn=number, terminal_id=terminal_id, created_by=actor,
                        created_at=now, updated_at=now,
                    )  # fmt: skip
                elif terminal_id is not None and current.terminal_id != terminal_id:
                    if current.terminal_id is not None:
                        raise KeysyncRegistrationConflict(
                            "the MDN is bound to another terminal: deregister it first"
                        )
                    uow.run(
                        update(Subscriber)
                        .where(Subscriber.mdn == number)
                        .values(terminal_id=terminal_id, updated_at=now)
                    )
                have = {
                    row.application_id
                    for row in uow.all(
                        select(Registration.application_id).where(Registration.mdn == number)
                    )
                }
                added = sorted(set(application_ids) - have)
                uow.insert_many(
                    Registration,
                    [
                        {"mdn": number, "application_id": app, "created_by": actor,
                         "created_at": now}
                        for app in added
                    ],
                )  # fmt: skip
                if added or current is None:
                    uow.audit(
                        "keysync.service_registered",
                        actor=actor,
                        subject=number,
                        details={"application_ids": added, "terminal_id": terminal_id},
                    )
        except IntegrityViolation:
            raise KeysyncRegistrationConflict(
                "the terminal is already bound to another MDN"
            ) from None
        return self.view(number)

    def deregister(self, mdn: str, application_id: str | None, *, actor: str) -> SubscriberView:
        """Remove one application's registration (its binding is replaced), or with None
        every one and the MDN's terminal binding (a SIM moved to another terminal)."""
        number = e164_form(mdn)
        now = self._clock()
        with self._db.work() as uow:
            if uow.one(_SUBSCRIBER.with_for_update(), b_mdn=number) is None:
                raise KeysyncNotFound("the MDN is not registered")
            registrations = delete(Registration).where(Registration.mdn == number)
            bindings = update(Binding).where(Binding.mdn == number, Binding.status == "active")
            if application_id is not None:
                registrations = registrations.where(Registration.application_id == application_id)
                bindings = bindings.where(Binding.application_id == application_id)
            else:
                uow.run(
                    update(Subscriber)
                    .where(Subscriber.mdn == number)
                    .values(terminal_id=None, updated_at=now)
                )
            uow.run(registrations)
            uow.run(bindings.values(status="replaced", active_slot=None, replaced_at=now))
            uow.audit(
                "keysync.service_deregistered",
                actor=actor,
                subject=number,
                details={"application_id": application_id},
            )
        return self.view(number)

    def view(self, mdn: str) -> SubscriberView:
        number = e164_form(mdn)
        with self._db.reading() as reads:
            found = reads.one(_SUBSCRIBER, b_mdn=number)
            if found is None:
                raise KeysyncNotFound("the MDN is not registered")
            apps = [
                row.application_id
                for row in reads.all(
                    select(Registration.application_id)
                    .where(Registration.mdn == number)
                    .order_by(Registration.application_id)
                )
            ]
            bindings = reads.all(
                select(
                    Binding.application_id,
                    Binding.key_id,
                    Binding.delivery_id,
                    Binding.created_at,
                    Binding.via,
                )
                .where(Binding.mdn == number, Binding.status == "active")
                .order_by(Binding.application_id)
            )
        return SubscriberView(
            found.mdn,
            found.terminal_id,
            apps,
            [
                {"application_id": b.application_id, "key_id": b.key_id,
                 "delivery_id": b.delivery_id, "via": b.via}
                for b in bindings
            ],
        )  # fmt: skip


# -- manufacturers' signing keys ------------------------------------------------------------


def register_manufacturer_key(
    db: Database, *, kid: str, manufacturer: str, public_key_pem: str, actor: str
) -> str:
    """Register a manifest signing key (Ed25519 or P-256); its algorithm."""
    if not KID.fullmatch(kid):
        raise KeysyncInvalidRecord("kid is 1-64 of A-Z a-z 0-9 . _ : -")
    try:
        key = load_public_key(public_key_pem.encode())
    except CryptoError as exc:
        raise KeysyncInvalidRecord(f"the public key does not load: {exc.message}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = "ed25519"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ec-p256"
    else:
        raise KeysyncInvalidRecord("a manifest signing key is Ed25519 or P-256")
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    try:
        with db.work() as uow:
            uow.insert(
                ManufacturerKey, kid=kid, manufacturer=manufacturer[:200], algorithm=algorithm,
                public_key_der=der, created_by=actor, created_at=utcnow(),
            )  # fmt: skip
            uow.audit(
                "keysync.manufacturer_key_registered",
                actor=actor,
                subject=kid,
                details={"manufacturer": manufacturer[:200], "algorithm": algorithm},
            )
    except IntegrityViolation:
        raise KeysyncRegistrationConflict(f"kid {kid!r} is already registered") from None
    return algorithm


# -- application platforms ----------------------------------------------------------------


@dataclass(frozen=True)
class PlatformView:
    application_id: str
    url: str
    signing: str
    hpke: str
    destination: str
    #: ``whsec_...`` (shown once, when made) or ``whpk_...``
    verifier: str | None = None


def destination_of(application_id: str) -> str:
    return DESTINATION_PREFIX + application_id


class Platforms:
    def __init__(
        self, db: Database, keystore: KeyStore, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock

    def register(
        self,
        application_id: str,
        *,
        url: str,
        hpke_public_key_pem: str,
        signing: str,
        actor: str,
        secret: bytes | None = None,
    ) -> PlatformView:
        """Create or replace a platform: where its keys go, sealed to which key, signed
        how. A new signing key is made each time (its verifier is in the answer)."""
        if not protocol.ID_PATTERN.fullmatch(application_id):
            raise KeysyncInvalidRecord(f"application IDs are {protocol.ID_RULE}")
        outbox.service.check_url(url)
        try:
            public = load_public_key(hpke_public_key_pem.encode())
            kind = protocol.platform_key_kind(public)
        except (CryptoError, ValueError):
            raise KeysyncInvalidRecord("the HPKE public key is an X25519 or P-256 key") from None
        der = public_key_to_der(public)
        key = outbox.make_signing_key(
            self._keystore, signing, secret=secret, label=f"keysync platform {application_id}"
        )
        destination = destination_of(application_id)
        now = self._clock()
        try:
            with self._db.work() as uow:
                outbox.put_destination(
                    uow, self._keystore, name=destination, url=url, key=key, now=now
                )
                exists = uow.scalar(
                    select(Platform.application_id)
                    .where(Platform.application_id == application_id)
                    .with_for_update()
                )
                values = {"hpke_kind": kind, "hpke_public_key_der": der, "updated_at": now}
                if exists is None:
                    uow.insert(
                        Platform, application_id=application_id, destination=destination,
                        created_by=actor, created_at=now, **values,
                    )  # fmt: skip
                else:
                    uow.run(
                        update(Platform)
                        .where(Platform.application_id == application_id)
                        .values(**values)
                    )
                uow.audit(
                    "keysync.platform_registered",
                    actor=actor,
                    subject=application_id,
                    details={"url": url[:200], "signing": signing, "hpke": kind},
                )
        except BaseException:
            self._keystore.destroy(key.handle)  # the work did not commit: nothing uses it
            raise
        return PlatformView(application_id, url, signing, kind, destination, key.verifier)

    def list(self) -> list[PlatformView]:
        query = select(Platform.application_id, Platform.hpke_kind, Platform.destination)
        destinations = {d.name: d for d in outbox.Outbox(self._db).destinations()}
        with self._db.reading() as reads:
            rows = reads.all(query.order_by(Platform.application_id))
        out = []
        for row in rows:
            found = destinations.get(row.destination)
            out.append(
                PlatformView(
                    row.application_id,
                    found.url if found else "",
                    found.signing if found else "",
                    row.hpke_kind,
                    row.destination,
                )
            )
        return out


# -- SMS gateways ---------------------------------------------------------------------------


def gateway_secret_info(name: str) -> bytes:
    return transcript(_GATEWAY_SECRET_LABEL, name.encode())


def register_gateway(
    db: Database,
    vault: Vault,
    *,
    name: str,
    webhook_url: str,
    secret: str,
    actor: str,
    reply_url: str | None = None,
    reply_account: str | None = None,
    reply_from: str | None = None,
) -> None:
    """Create or replace an SMS gateway. ``webhook_url`` is the URL the gateway calls (what
    its signature covers, as it sees it); ``secret`` its signing secret (Twilio: the auth
    token), stored sealed by the key store."""
    if not GATEWAY_NAME.fullmatch(name):
        raise KeysyncInvalidRecord("a gateway name is 1-64 of a-z 0-9 -")
    outbox.service.check_url(webhook_url)
    if reply_url is not None:
        outbox.service.check_url(reply_url)
    if not secret or len(secret) > 200:
        raise KeysyncInvalidRecord("the gateway secret is 1-200 characters")
    kek, sealed = vault.seal(secret.encode(), gateway_secret_info(name))
    now = utcnow()
    values = {
        "webhook_url": webhook_url,
        "sealed_secret": sealed,
        "kek_handle": kek,
        "reply_url": reply_url,
        "reply_account": reply_account,
        "reply_from": reply_from,
        "updated_at": now,
    }
    with db.work() as uow:
        exists = uow.scalar(select(Gateway.name).where(Gateway.name == name).with_for_update())
        if exists is None:
            uow.insert(Gateway, name=name, created_at=now, **values)
        else:
            uow.run(update(Gateway).where(Gateway.name == name).values(**values))
        uow.audit(
            "keysync.gateway_registered",
            actor=actor,
            subject=name,
            details={"webhook_url": webhook_url[:200], "replies": reply_url is not None},
        )
