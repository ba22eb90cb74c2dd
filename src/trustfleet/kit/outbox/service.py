"""The outbox's use cases: destinations, enqueueing inside a caller's unit of work, the
delivery status, redelivery and pausing a destination.

A capability enqueues a message in the same unit of work that records what the message
reports (the transactional outbox): the message exists exactly when that work committed.
Destinations and payloads are opaque here: the capability names its destinations and
seals whatever is secret in its payloads before it enqueues them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import bindparam, func, select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import Conflict, InvalidInput, NotFound, TrustfleetError
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.kit.outbox import webhooks
from trustfleet.kit.outbox.models import OutboxDestination, OutboxMessage
from trustfleet.store import Database, UnitOfWork
from trustfleet.wire.times import as_utc, utcnow

#: Standard Webhooks' schedule: seconds before attempt 1, 2, ... (then dead-lettered)
DEFAULT_SCHEDULE: tuple[int, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
MESSAGE_ID_PREFIX = "msg_"
MAX_URL = 2000

#: set after a unit of work that enqueued commits: an idle worker of this process wakes up
wakeup = threading.Event()


class OutboxError(TrustfleetError):
    code = "outbox-error"
    status = 400
    title = "The outbox request failed"


class UnknownDestination(OutboxError, NotFound):
    code = "outbox-unknown-destination"
    status = 404
    title = "No outbox destination has that name"


class UnknownMessage(OutboxError, NotFound):
    code = "outbox-unknown-message"
    status = 404
    title = "No outbox message has that id"


class MessagePending(OutboxError, Conflict):
    code = "outbox-message-pending"
    status = 409
    title = "The message is still being delivered; only delivered or dead messages redeliver"


class InvalidDestination(OutboxError, InvalidInput):
    code = "outbox-invalid-destination"
    title = "The destination's URL or signing method is not valid"


def parse_schedule(text: str) -> tuple[int, ...]:
    """``"0,5,300"`` -> (0, 5, 300); at least one attempt, no negative delay."""
    try:
        schedule = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidInput("the retry schedule is a comma-separated list of seconds") from None
    if not schedule or any(delay < 0 for delay in schedule):
        raise InvalidInput("the retry schedule needs at least one non-negative delay")
    return schedule


def new_message_id() -> str:
    """A fresh message id (the ``webhook-id`` of every attempt)."""
    return MESSAGE_ID_PREFIX + secrets.token_hex(16)


# -- destinations ------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A destination's new signing key: its key store handle, and what the receiver is
    given to verify (``whsec_...`` for v1, shown once; ``whpk_...`` for v1a)."""

    handle: str
    signing: str
    verifier: str


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > MAX_URL:
        raise InvalidDestination("the URL must be http(s)://host/... (at most 2000 characters)")
    return url


def make_signing_key(
    keystore: KeyStore, signing: str, *, secret: bytes | None = None, label: str = ""
) -> SigningKey:
    """A key store key for a destination (call it outside any unit of work): v1 an HMAC
    key (``secret`` if given, else 32 random bytes), v1a an Ed25519 key made in the store."""
    if signing == webhooks.HMAC_VERSION:
        material = secret if secret is not None else secrets.token_bytes(32)
        info = keystore.import_key(KeyAlgorithm.HMAC_SHA256, material, KeyUsage.MAC, label=label)
        return SigningKey(info.handle, signing, webhooks.encode_secret(material))
    if signing == webhooks.ED25519_VERSION:
        if secret is not None:
            raise InvalidDestination("v1a signing uses a key made by trustfleet, not a secret")
        info = keystore.generate(KeyAlgorithm.ED25519, KeyUsage.SIGN, label=label)
        public = keystore.public_key(info.handle)
        from cryptography.hazmat.primitives.asymmetric import ed25519

        assert isinstance(public, ed25519.Ed25519PublicKey)
        return SigningKey(info.handle, signing, webhooks.encode_public_key(public))
    raise InvalidDestination("signing is v1 (HMAC-SHA256) or v1a (Ed25519)")


_DESTINATION = select(
    OutboxDestination.name,
    OutboxDestination.url,
    OutboxDestination.signing,
    OutboxDestination.key_handle,
    OutboxDestination.paused_at,
).where(OutboxDestination.name == bindparam("b_name"))
_DESTINATION_LOCKED = _DESTINATION.with_for_update()


def put_destination(
    uow: UnitOfWork,
    keystore: KeyStore,
    *,
    name: str,
    url: str,
    key: SigningKey | None,
    now: datetime,
) -> None:
    """Create or update a destination in the caller's unit of work; a replaced signing key
    is destroyed once the work commits. ``key`` may be None only for an existing one."""
    check_url(url)
    current = uow.one(_DESTINATION_LOCKED, b_name=name)
    if current is None:
        if key is None:
            raise InvalidDestination("a new destination needs a signing key")
        uow.insert(
            OutboxDestination,
            name=name,
            url=url,
            signing=key.signing,
            key_handle=key.handle,
            paused_at=None,
            created_at=now,
            updated_at=now,
        )
        return
    values: dict[str, Any] = {"url": url, "updated_at": now}
    if key is not None:
        values |= {"signing": key.signing, "key_handle": key.handle}
        uow.destroy_after_commit(keystore, current.key_handle)
    uow.run(update(OutboxDestination).where(OutboxDestination.name == name).values(**values))


@dataclass(frozen=True)
class DestinationView:
    name: str
    url: str
    signing: str
    paused: bool
    pending: int
    delivered: int
    dead: int


@dataclass(frozen=True)
class MessageView:
    id: str
    destination: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    size: int


_MESSAGE_COLUMNS = (
    OutboxMessage.id,
    OutboxMessage.destination,
    OutboxMessage.event_type,
    OutboxMessage.status,
    OutboxMessage.attempts,
    OutboxMessage.next_attempt_at,
    OutboxMessage.last_error,
    OutboxMessage.created_at,
    OutboxMessage.delivered_at,
    func.length(OutboxMessage.payload).label("size"),
)


def _message_view(row: Any) -> MessageView:
    return MessageView(
        id=row.id,
        destination=row.destination,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=as_utc(row.next_attempt_at) if row.status == "pending" else None,
        last_error=row.last_error,
        created_at=as_utc(row.created_at),
        delivered_at=as_utc(row.delivered_at) if row.delivered_at else None,
        size=int(row.size or 0),
    )


# -- enqueueing ------------------------------------------------------------------------


def enqueue(
    uow: UnitOfWork,
    *,
    destination: str,
    event_type: str,
    payload: bytes,
    now: datetime,
    message_id: str | None = None,
) -> str:
    """Add a message in the caller's unit of work: it exists, and is due at once, exactly
    when that work commits. Its id (give one to bind it into the payload first)."""
    chosen = message_id or new_message_id()
    uow.insert(
        OutboxMessage,
        id=chosen,
        destination=destination,
        event_type=event_type,
        payload=payload,
        status="pending",
        attempts=0,
        next_attempt_at=now,
        last_error=None,
        created_at=now,
        updated_at=now,
        delivered_at=None,
    )
    uow.after_commit(wakeup.set)
    return chosen


# -- operating the outbox ----------------------------------------------------------------


class Outbox:
    """Status, redelivery and pausing, for operators (API and CLI)."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    def destinations(self) -> list[DestinationView]:
        counts = select(OutboxMessage.destination, OutboxMessage.status, func.count()).group_by(
            OutboxMessage.destination, OutboxMessage.status
        )
        names = select(
            OutboxDestination.name,
            OutboxDestination.url,
            OutboxDestination.signing,
            OutboxDestination.paused_at,
        ).order_by(OutboxDestination.name)
        with self._db.reading() as reads:
            tally: dict[tuple[str, str], int] = {
                (row[0], row[1]): int(row[2]) for row in reads.all(counts)
            }
            rows = reads.all(names)
        return [
            DestinationView(
                name=row.name,
                url=row.url,
                signing=row.signing,
                paused=row.paused_at is not None,
                pending=tally.get((row.name, "pending"), 0),
                delivered=tally.get((row.name, "delivered"), 0),
                dead=tally.get((row.name, "dead"), 0),
            )
            for row in rows
        ]

    def messages(
        self,
        *,
        status: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        destinations: Sequence[str] | None = None,
    ) -> list[MessageView]:
        query = select(*_MESSAGE_COLUMNS)
        if status is not None:
            query = query.where(OutboxMessage.status == status)
        if destination is not None:
            query = query.where(OutboxMessage.destination == destination)
        if destinations is not None:
            query = query.where(OutboxMessage.destination.in_(list(destinations)))
        query = query.order_by(OutboxMessage.created_at.desc(), OutboxMessage.id).limit(limit)
        with self._db.reading() as reads:
            return [_message_view(row) for row in reads.all(query)]

    def message(self, message_id: str) -> MessageView:
        query = select(*_MESSAGE_COLUMNS).where(OutboxMessage.id == message_id)
        with self._db.reading() as reads:
            row = reads.one(query)
        if row is None:
            raise UnknownMessage(f"no outbox message {message_id[:60]!r}")
        return _message_view(row)

    def redeliver(self, message_id: str, *, actor: str) -> MessageView:
        """Send a delivered or dead message again (same id: the receiver deduplicates)."""
        now = self._clock()
        with self._db.work() as uow:
            status = uow.scalar(
                select(OutboxMessage.status).where(OutboxMessage.id == message_id).with_for_update()
            )
            if status is None:
                raise UnknownMessage(f"no outbox message {message_id[:60]!r}")
            if status == "pending":
                raise MessagePending()
            uow.run(
                update(OutboxMessage)
                .where(OutboxMessage.id == message_id)
                .values(status="pending", attempts=0, next_attempt_at=now, updated_at=now)
            )
            uow.audit(
                "outbox.redelivery_requested",
                actor=actor,
                subject=message_id,
                details={"previous_status": status},
            )
            uow.after_commit(wakeup.set)
        return self.message(message_id)

    def set_paused(self, name: str, paused: bool, *, actor: str) -> DestinationView:
        """Pause (no attempts until resumed; messages wait, nothing is lost) or resume."""
        now = self._clock()
        with self._db.work() as uow:
            found = uow.one(_DESTINATION_LOCKED, b_name=name)
            if found is None:
                raise UnknownDestination(f"no outbox destination {name[:80]!r}")
            uow.run(
                update(OutboxDestination)
                .where(OutboxDestination.name == name)
                .values(paused_at=now if paused else None, updated_at=now)
            )
            uow.audit(
                "outbox.destination_paused" if paused else "outbox.destination_resumed",
                actor=actor,
                subject=name,
            )
            if not paused:
                uow.after_commit(wakeup.set)
        return next(d for d in self.destinations() if d.name == name)


def lease_until(now: datetime, timeout_seconds: int) -> datetime:
    """When a claimed message becomes due again if its worker never reports back."""
    return now + timedelta(seconds=2 * timeout_seconds + 5)
