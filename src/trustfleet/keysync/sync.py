"""The key-sync request: from an SMS gateway's webhook or a device gateway, to the binding
MDN <-> application ID <-> key ID <-> key and the delivery of the key, sealed, to the
application's platform.

Checks, in order (each refusal has its code and an audit record, and binds nothing):
the gateway's signature (SMS); the request's grammar; the MDN is registered; the key ID is
known; the MAC verifies under that key for this MDN; the counter is above the last one
accepted for the key; the key belongs to the terminal this MDN is bound to (an MDN is
bound to the terminal of its first successful request, or at registration); the
application ID is given when the terminal holds several keys, and the MDN is registered
for it; a platform is registered for it. Then one unit of work moves the key's counter,
records the binding and enqueues the sealed delivery (transactional outbox). A request
whose MAC verified consumes its counter even when a later check refuses it, so a refused
request cannot be replayed once the refusal's cause is fixed.
"""

from __future__ import annotations

import base64
import functools
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.serialization import load_der_public_key
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import aliased

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keysync import protocol
from trustfleet.keysync.errors import (
    KeysyncApplicationIdRequired,
    KeysyncApplicationNotRegistered,
    KeysyncBadGatewaySignature,
    KeysyncBadMac,
    KeysyncError,
    KeysyncKeyApplicationMismatch,
    KeysyncKeyOfAnotherTerminal,
    KeysyncNoPlatform,
    KeysyncReplayedCounter,
    KeysyncUnknownGateway,
    KeysyncUnknownKeyId,
    KeysyncUnregisteredMdn,
)
from trustfleet.keysync.models import (
    Binding,
    Gateway,
    KeyImport,
    Platform,
    Registration,
    Subscriber,
    TerminalKey,
)
from trustfleet.keysync.registration import e164_form, gateway_secret_info
from trustfleet.keysync.vault import Vault, key_row_aad, open_key
from trustfleet.kit import outbox
from trustfleet.store import Database, IntegrityViolation, UnitOfWork
from trustfleet.store.refusals import RefusalAudit
from trustfleet.wire import utcnow

log = logging.getLogger("trustfleet.keysync")

REPLY_REFUSED = "KS1 REFUSED"
REPLY_TIMEOUT_SECONDS = 5

_SUBSCRIBER = select(Subscriber.terminal_id).where(Subscriber.mdn == bindparam("b_mdn"))
#: the MDN's terminal, and each application it is registered for with its platform
_REGISTERED = (
    select(
        Subscriber.terminal_id,
        Registration.application_id,
        Platform.hpke_public_key_der,
        Platform.destination,
    )
    .outerjoin(Registration, Registration.mdn == Subscriber.mdn)
    .outerjoin(Platform, Platform.application_id == Registration.application_id)
    .where(Subscriber.mdn == bindparam("b_mdn"))
)
_OTHER_KEYS = aliased(TerminalKey)
#: the key, its import's sealed DEK, the MDN its terminal is bound to and how many keys
#: that terminal holds
_KEY = (
    select(
        TerminalKey.key_id,
        TerminalKey.terminal_id,
        TerminalKey.application_id,
        TerminalKey.algorithm,
        TerminalKey.sealed_key,
        TerminalKey.last_counter,
        TerminalKey.import_id,
        KeyImport.kek_handle,
        KeyImport.sealed_dek,
        select(Subscriber.mdn)
        .where(Subscriber.terminal_id == TerminalKey.terminal_id)
        .scalar_subquery()
        .label("owner"),
        select(func.count())
        .select_from(_OTHER_KEYS)
        .where(_OTHER_KEYS.terminal_id == TerminalKey.terminal_id)
        .scalar_subquery()
        .label("keys"),
    )
    .join(KeyImport, KeyImport.id == TerminalKey.import_id)
    .where(TerminalKey.key_id == bindparam("b_key_id"))
)
_TERMINAL_MDN = select(Subscriber.mdn).where(Subscriber.terminal_id == bindparam("b_terminal"))
_TERMINAL_MDN_LOCKED = _TERMINAL_MDN.with_for_update()
_CONSUME = (
    update(TerminalKey)
    .where(TerminalKey.key_id == bindparam("b_key_id"), TerminalKey.last_counter < bindparam("b_c"))
    .values(last_counter=bindparam("b_c"))
)
_PIN = (
    update(Subscriber)
    .where(Subscriber.mdn == bindparam("b_mdn"), Subscriber.terminal_id.is_(None))
    .values(terminal_id=bindparam("b_terminal"), updated_at=bindparam("b_now"))
)
_REPLACE = (
    update(Binding)
    .where(Binding.active_slot == bindparam("b_slot"))
    .values(status="replaced", active_slot=None, replaced_at=bindparam("b_now"))
)


@functools.lru_cache(maxsize=1024)
def _platform_key(der: bytes) -> Any:
    """A platform's HPKE public key, parsed once per process (keys are immutable values)."""
    return load_der_public_key(der)


_GATEWAY = select(
    Gateway.webhook_url,
    Gateway.sealed_secret,
    Gateway.kek_handle,
    Gateway.reply_url,
    Gateway.reply_account,
    Gateway.reply_from,
).where(Gateway.name == bindparam("b_name"))

#: opened gateway secrets by (gateway, sealed secret): a changed secret misses
_secrets: dict[tuple[str, bytes], bytes] = {}
_secrets_lock = threading.Lock()


@dataclass(frozen=True)
class Bound:
    """A request that bound a key and queued its delivery."""

    mdn: str
    key_id: str
    application_id: str
    terminal_id: str
    delivery_id: str
    counter: int


@dataclass
class _Checked:
    mdn: str
    request: protocol.SyncRequest
    terminal_id: str = ""
    mac_verified: bool = False


#: sends a reply SMS: (gateway row, to MDN, text)
ReplySender = Callable[[Any, str, str], None]


def twilio_signature(secret: bytes, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the URL followed by each parameter's
    name and value, sorted by name then value."""
    data = url
    names = sorted({name for name, _ in params})
    for name in names:
        for value in sorted({v for n, v in params if n == name}):
            data += name + value
    mac = pyca_hmac.HMAC(secret, hashes.SHA1())  # noqa: S303 - Twilio's scheme
    mac.update(data.encode())
    return base64.b64encode(mac.finalize()).decode("ascii")


def _url_variants(url: str) -> list[str]:
    """The URL as configured, without its port and with the scheme's default port (gateways
    differ in which they sign, as Twilio's own validator allows)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = 443 if parts.scheme == "https" else 80
    without = urlunsplit(parts._replace(netloc=host))
    with_port = urlunsplit(parts._replace(netloc=f"{host}:{parts.port or default}"))
    return list(dict.fromkeys([url, without, with_port]))


def send_reply(gateway: Any, to: str, text: str) -> None:
    """A reply SMS through the gateway's outbound API (Twilio's Messages form: To, From,
    Body, HTTP basic auth with the account and the gateway's secret)."""
    secret = gateway.secret
    with httpx.Client(timeout=REPLY_TIMEOUT_SECONDS) as client:
        client.post(
            gateway.reply_url,
            data={"To": to, "From": gateway.reply_from or "", "Body": text},
            auth=(gateway.reply_account or "", secret.decode()),
        )


@dataclass(frozen=True)
class _Gateway:
    name: str
    webhook_url: str
    secret: bytes
    reply_url: str | None
    reply_account: str | None
    reply_from: str | None


class KeySync:
    def __init__(
        self,
        db: Database,
        vault: Vault,
        *,
        clock: Callable[[], datetime] = utcnow,
        reply: ReplySender = send_reply,
        refusals: RefusalAudit | None = None,
    ) -> None:
        self._db = db
        #: the rate limit for refused gateway calls (forged signatures cost the audit log
        #: little); without one, each is audited
        self._refusals = refusals
        self._vault = vault
        self._clock = clock
        self._reply = reply

    # -- the SMS gateway's webhook ----------------------------------------------------

    def sms(
        self,
        gateway_name: str,
        params: Sequence[tuple[str, str]],
        signature: str | None,
        *,
        client: str = "",
    ) -> Bound:
        """An inbound SMS as the gateway posted it (form fields), with its signature;
        ``client`` is the caller's address (refused calls are audited per client at a
        bounded rate)."""
        actor = f"sms-gateway:{gateway_name[:64]}"
        gateway = self._gateway(gateway_name)
        if gateway is None:
            self._refused_gateway(actor, KeysyncUnknownGateway(), params, client)
        presented = (signature or "").encode()
        if not presented or not any(  # lazily: the configured URL is usually the one signed
            hmac.compare_digest(twilio_signature(gateway.secret, url, params).encode(), presented)
            for url in _url_variants(gateway.webhook_url)
        ):
            self._refused_gateway(actor, KeysyncBadGatewaySignature(), params, client)
        fields = dict(params)
        sender = fields.get("From", "")
        try:
            return self.request(
                mdn=sender, body=fields.get("Body", ""), via="sms", actor=actor,
                context={"gateway": gateway.name, "message_sid": fields.get("MessageSid", "")[:64]},
            )  # fmt: skip
        except KeysyncError as refusal:
            self._maybe_reply(gateway, sender, refusal)
            raise

    def _gateway(self, name: str) -> _Gateway | None:
        row = self._db.read(lambda reads: reads.one(_GATEWAY, b_name=name))
        if row is None:
            return None
        cache_key = (name, bytes(row.sealed_secret))
        with _secrets_lock:
            secret = _secrets.get(cache_key)
        if secret is None:
            secret = self._vault.open(row.kek_handle, row.sealed_secret, gateway_secret_info(name))
            with _secrets_lock:
                _secrets[cache_key] = secret
        return _Gateway(name, row.webhook_url, secret, row.reply_url, row.reply_account,
                        row.reply_from)  # fmt: skip

    def _refused_gateway(
        self, actor: str, error: KeysyncError, params: Sequence[tuple[str, str]], client: str
    ) -> NoReturn:
        subject = dict(params).get("From", "")[:20]
        details = {"code": error.code, "via": "sms"}
        if self._refusals is not None:
            self._refusals.refused(
                "keysync.sync_refused",
                actor=actor,
                subject=subject,
                client=client,
                kind=error.code,
                details=details,
            )
            raise error
        with self._db.work() as uow:
            uow.audit(
                "keysync.sync_refused",
                actor=actor,
                subject=subject,
                outcome="failure",
                details={**details, "client": client} if client else details,
            )
        raise error

    def _maybe_reply(self, gateway: _Gateway, sender: str, refusal: KeysyncError) -> None:
        """Tell a registered terminal that its request was refused (no detail): only
        registered MDNs get replies, so spoofed senders cannot make this an SMS relay."""
        if gateway.reply_url is None or isinstance(refusal, KeysyncUnregisteredMdn):
            return
        try:
            mdn = e164_form(sender)
            if self._db.read(lambda reads: reads.one(_SUBSCRIBER, b_mdn=mdn)) is None:
                return
            self._reply(gateway, mdn, REPLY_REFUSED)
        except Exception as exc:  # the refusal stands whether or not the reply goes out
            log.warning("keysync: reply SMS not sent: %s", type(exc).__name__)

    # -- the request ------------------------------------------------------------------

    def request(
        self,
        *,
        mdn: str,
        body: str,
        via: str,
        actor: str,
        context: dict[str, Any] | None = None,
    ) -> Bound:
        """Check a key-sync request from ``mdn`` (from the SMS, or asserted by a device
        gateway) and bind it; a refusal is audited and raised."""
        details = dict(context or {})
        checked: _Checked | None = None
        try:
            number = e164_form(mdn)
            checked = _Checked(number, protocol.SyncRequest.parse(body))
            return self._bind(checked, via=via, actor=actor, details=details)
        except KeysyncError as refusal:
            self._refused(checked, mdn, refusal, via=via, actor=actor, details=details)
            raise

    def _bind(self, checked: _Checked, *, via: str, actor: str, details: dict[str, Any]) -> Bound:
        mdn, request = checked.mdn, checked.request
        with self._db.reading() as reads:
            registered = reads.all(_REGISTERED, b_mdn=mdn)
            key = reads.one(_KEY, b_key_id=request.key_id)
        apps = {row.application_id: row for row in registered if row.application_id}
        if not apps:
            raise KeysyncUnregisteredMdn()
        if key is None:
            raise KeysyncUnknownKeyId()
        algorithm = KeyAlgorithm(key.algorithm)
        dek = self._vault.open_dek(key.kek_handle, key.sealed_dek, key.import_id)
        material = open_key(
            dek,
            key.sealed_key,
            key_row_aad(key.key_id, key.terminal_id, key.application_id, key.algorithm),
        )
        if not protocol.verify_request(request, material, algorithm, mdn):
            raise KeysyncBadMac()
        checked.mac_verified = True
        checked.terminal_id = key.terminal_id
        if request.counter <= key.last_counter:
            raise KeysyncReplayedCounter()
        pinned = registered[0].terminal_id
        if pinned not in (None, key.terminal_id) or key.owner not in (None, mdn):
            raise KeysyncKeyOfAnotherTerminal()
        application_id = self._application(request, key.application_id, key.keys, list(apps))
        platform = apps[application_id]
        if platform.destination is None:
            raise KeysyncNoPlatform()
        delivery_id = outbox.new_message_id()
        now = self._clock()
        payload = protocol.seal_delivery(
            protocol.KeyDelivery(mdn, key.key_id, material, application_id, key.algorithm),
            platform_key=_platform_key(platform.hpke_public_key_der),
            delivery_id=delivery_id,
            timestamp=int(now.timestamp()),
        )
        del material
        bound = Bound(
            mdn, key.key_id, application_id, key.terminal_id, delivery_id, request.counter
        )
        try:
            with self._db.work() as uow:
                self._record(uow, bound, platform.destination, payload, via, actor, details, now)
        except IntegrityViolation:  # the terminal was bound to another MDN meanwhile
            raise KeysyncKeyOfAnotherTerminal() from None
        return bound

    @staticmethod
    def _application(
        request: protocol.SyncRequest, key_app: str | None, count: int, apps: list[str]
    ) -> str:
        wanted = request.application_id
        if wanted is None:
            if count > 1:
                raise KeysyncApplicationIdRequired()
            wanted = key_app
            if wanted is None:
                if len(apps) != 1:
                    raise KeysyncApplicationIdRequired()
                wanted = apps[0]
        if key_app is not None and key_app != wanted:
            raise KeysyncKeyApplicationMismatch()
        if wanted not in apps:
            raise KeysyncApplicationNotRegistered()
        return wanted

    def _record(
        self,
        uow: UnitOfWork,
        bound: Bound,
        destination: str,
        payload: bytes,
        via: str,
        actor: str,
        details: dict[str, Any],
        now: datetime,
    ) -> None:
        if not uow.run(_CONSUME, b_key_id=bound.key_id, b_c=bound.counter):
            raise KeysyncReplayedCounter()  # a concurrent request took this counter
        owner = uow.scalar(_TERMINAL_MDN_LOCKED, b_terminal=bound.terminal_id)
        if owner not in (None, bound.mdn):
            raise KeysyncKeyOfAnotherTerminal()
        uow.run(_PIN, b_mdn=bound.mdn, b_terminal=bound.terminal_id, b_now=now)
        slot = f"{bound.mdn}|{bound.application_id}"
        uow.run(_REPLACE, b_slot=slot, b_now=now)
        uow.insert(
            Binding, mdn=bound.mdn, application_id=bound.application_id, key_id=bound.key_id,
            terminal_id=bound.terminal_id, delivery_id=bound.delivery_id, status="active",
            active_slot=slot, counter=bound.counter, via=via, created_at=now, replaced_at=None,
        )  # fmt: skip
        outbox.enqueue(
            uow,
            destination=destination,
            event_type=protocol.DELIVERY_EVENT,
            payload=payload,
            now=now,
            message_id=bound.delivery_id,
        )
        uow.audit(
            "keysync.key_bound",
            actor=actor,
            subject=bound.mdn,
            details={
                **details,
                "key_id": bound.key_id,
                "application_id": bound.application_id,
                "terminal_id": bound.terminal_id,
                "delivery_id": bound.delivery_id,
                "counter": bound.counter,
                "via": via,
            },
        )

    def _refused(
        self,
        checked: _Checked | None,
        mdn: str,
        refusal: KeysyncError,
        *,
        via: str,
        actor: str,
        details: dict[str, Any],
    ) -> None:
        record = {**details, "code": refusal.code, "via": via}
        if checked is not None:
            record["key_id"] = checked.request.key_id
            record["counter"] = checked.request.counter
        with self._db.work() as uow:
            if checked is not None and checked.mac_verified:
                uow.run(_CONSUME, b_key_id=checked.request.key_id, b_c=checked.request.counter)
            uow.audit(
                "keysync.sync_refused",
                actor=actor,
                subject=(checked.mdn if checked else mdn)[:20],
                outcome="failure",
                details=record,
            )
