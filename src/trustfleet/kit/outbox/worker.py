"""The delivery worker: claims due messages, signs and sends each as a Standard Webhooks
request, and records the outcome.

Claiming moves a message's ``next_attempt_at`` a lease ahead and counts the attempt, in a
short unit of work; on PostgreSQL the claim skips rows another worker has locked
(``FOR UPDATE SKIP LOCKED``), so any number of workers share the queue. On SQLite the
unit of work holds the database's write lock, so claims are one at a time (run one worker).
The request is sent outside any transaction; its outcome is recorded in another. A worker
killed between the two leaves the message claimed: it is due again when the lease ends and
is sent again with the same ``webhook-id``, which receivers deduplicate on. So a message is
delivered at least once, and stored once by a receiver that deduplicates.

A 2xx answer delivers the message. Anything else (another status, a timeout, a refused
connection) schedules the next attempt after the schedule's next delay; after the last
attempt the message is dead (dead-lettered) until an operator redelivers it.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import bindparam, select, update

from trustfleet import __version__
from trustfleet.keystore.base import KeyStore
from trustfleet.kit.outbox import webhooks
from trustfleet.kit.outbox.models import OutboxDestination, OutboxMessage
from trustfleet.kit.outbox.service import DEFAULT_SCHEDULE, lease_until, wakeup
from trustfleet.store import Database
from trustfleet.wire.times import utcnow

log = logging.getLogger("trustfleet.outbox")

DEFAULT_BATCH = 32
IDLE_SECONDS = 1.0
USER_AGENT = f"trustfleet-outbox/{__version__}"


def _due(batch: int) -> Any:
    """Due messages of unpaused destinations, oldest first, skipping rows another worker
    has locked (PostgreSQL; SQLite renders no locking clause)."""
    return (
        select(OutboxMessage.id)
        .join(OutboxDestination, OutboxDestination.name == OutboxMessage.destination)
        .where(
            OutboxMessage.status == "pending",
            OutboxMessage.next_attempt_at <= bindparam("b_now"),
            OutboxDestination.paused_at.is_(None),
        )
        .order_by(OutboxMessage.next_attempt_at)
        .limit(batch)
        .with_for_update(of=OutboxMessage, skip_locked=True)
    )


_CLAIM = (
    update(OutboxMessage)
    .where(OutboxMessage.id == bindparam("b_id"), OutboxMessage.status == "pending")
    .values(
        attempts=OutboxMessage.attempts + 1,
        next_attempt_at=bindparam("b_lease"),
        updated_at=bindparam("b_now"),
    )
)
_CLAIMED = (
    select(
        OutboxMessage.id,
        OutboxMessage.event_type,
        OutboxMessage.payload,
        OutboxMessage.attempts,
        OutboxDestination.name,
        OutboxDestination.url,
        OutboxDestination.signing,
        OutboxDestination.key_handle,
    )
    .join(OutboxDestination, OutboxDestination.name == OutboxMessage.destination)
    .where(OutboxMessage.id == bindparam("b_id"))
)
_DELIVERED = (
    update(OutboxMessage)
    .where(OutboxMessage.id == bindparam("b_id"), OutboxMessage.status == "pending")
    .values(
        status="delivered",
        delivered_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        last_error=None,
    )
)
_RETRY = (
    update(OutboxMessage)
    .where(
        OutboxMessage.id == bindparam("b_id"),
        OutboxMessage.status == "pending",
        OutboxMessage.attempts == bindparam("b_attempts"),
    )
    .values(
        next_attempt_at=bindparam("b_next"),
        updated_at=bindparam("b_now"),
        last_error=bindparam("b_error"),
    )
)
_DEAD = (
    update(OutboxMessage)
    .where(
        OutboxMessage.id == bindparam("b_id"),
        OutboxMessage.status == "pending",
        OutboxMessage.attempts == bindparam("b_attempts"),
    )
    .values(status="dead", updated_at=bindparam("b_now"), last_error=bindparam("b_error"))
)


@dataclass(frozen=True, slots=True)
class Claimed:
    id: str
    event_type: str
    payload: bytes
    attempts: int
    destination: str
    url: str
    signing: str
    key_handle: str


@dataclass(frozen=True, slots=True)
class Outcome:
    message: Claimed
    error: str | None  # None: delivered


class DeliveryWorker:
    """One worker: :meth:`run_once` for one batch, :meth:`run` until stopped."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        *,
        schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
        timeout_seconds: int = 10,
        batch: int = DEFAULT_BATCH,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = utcnow,
        actor: str = "outbox-worker",
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._schedule = schedule
        self._timeout = timeout_seconds
        self._due = _due(batch)
        self._client = client or httpx.Client(
            timeout=timeout_seconds, headers={"user-agent": USER_AGENT}
        )
        self._clock = clock
        self._actor = actor

    def close(self) -> None:
        self._client.close()

    # -- one batch -------------------------------------------------------------------

    def claim(self) -> list[Claimed]:
        now = self._clock()
        lease = lease_until(now, self._timeout)
        with self._db.work() as uow:
            ids = [row.id for row in uow.all(self._due, b_now=now)]
            for message_id in ids:
                uow.run(_CLAIM, b_id=message_id, b_lease=lease, b_now=now)
            claimed = [Claimed(*uow.one(_CLAIMED, b_id=message_id)) for message_id in ids]
        return claimed

    def send(self, message: Claimed) -> Outcome:
        timestamp = int(self._clock().timestamp())
        content = webhooks.signed_content(message.id, timestamp, message.payload)
        try:
            if message.signing == webhooks.HMAC_VERSION:
                raw = self._keystore.mac(message.key_handle, content)
            else:
                raw = self._keystore.sign(message.key_handle, content)
        except Exception as exc:  # a key store failure must not stop the worker
            log.warning("outbox: cannot sign %s: %s", message.id, type(exc).__name__)
            return Outcome(message, f"signing failed: {type(exc).__name__}")
        signature = f"{message.signing},{base64.b64encode(raw).decode('ascii')}"
        headers = {
            "content-type": "application/json",
            **webhooks.headers(message.id, timestamp, signature),
        }
        try:
            response = self._client.post(message.url, content=message.payload, headers=headers)
        except httpx.TimeoutException:
            return Outcome(message, "timeout")
        except httpx.ConnectError:
            return Outcome(message, "connection failed")
        except httpx.HTTPError as exc:
            return Outcome(message, f"transport error: {type(exc).__name__}")
        if 200 <= response.status_code < 300:
            return Outcome(message, None)
        return Outcome(message, f"HTTP {response.status_code}")

    def record(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        now = self._clock()
        with self._db.work() as uow:
            for outcome in outcomes:
                message = outcome.message
                details: dict[str, Any] = {
                    "destination": message.destination,
                    "event_type": message.event_type,
                    "attempts": message.attempts,
                }
                if outcome.error is None:
                    if uow.run(_DELIVERED, b_id=message.id, b_now=now):
                        uow.audit(
                            "outbox.delivered", actor=self._actor, subject=message.id,
                            details=details,
                        )  # fmt: skip
                    continue
                error = outcome.error[:200]
                if message.attempts >= len(self._schedule):
                    dead = uow.run(
                        _DEAD, b_id=message.id, b_attempts=message.attempts, b_now=now,
                        b_error=error,
                    )  # fmt: skip
                    if dead:
                        uow.audit(
                            "outbox.dead_lettered", actor=self._actor, subject=message.id,
                            outcome="failure", details={**details, "error": error},
                        )  # fmt: skip
                    continue
                delay = timedelta(seconds=self._schedule[message.attempts])
                uow.run(
                    _RETRY, b_id=message.id, b_attempts=message.attempts, b_now=now,
                    b_next=now + delay, b_error=error,
                )  # fmt: skip

    def run_once(self) -> int:
        """Claim one batch, send it, record the outcomes; how many were attempted."""
        claimed = self.claim()
        outcomes = [self.send(message) for message in claimed]
        self.record(outcomes)
        for outcome in outcomes:
            if outcome.error:
                log.info("outbox: %s attempt %d failed: %s", outcome.message.id,
                         outcome.message.attempts, outcome.error)  # fmt: skip
        return len(claimed)

    def run(self, stop: threading.Event, *, idle_seconds: float = IDLE_SECONDS) -> None:
        """Deliver until ``stop`` is set; sleeps ``idle_seconds`` (or until something is
        enqueued in this process) when nothing is due."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the database went away for a moment, say: try again later
                log.exception("outbox: delivery round failed")
                busy = 0
            if not busy:
                wakeup.wait(idle_seconds)
                wakeup.clear()


@dataclass
class RunningWorker:
    """A worker on a background thread (``trustfleet serve`` runs one by default)."""

    worker: DeliveryWorker
    thread: threading.Thread
    stop_event: threading.Event

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        wakeup.set()
        self.thread.join(timeout)
        self.worker.close()


def start_in_thread(worker: DeliveryWorker, *, idle_seconds: float = IDLE_SECONDS) -> RunningWorker:
    stop_event = threading.Event()
    thread = threading.Thread(
        target=worker.run,
        args=(stop_event,),
        kwargs={"idle_seconds": idle_seconds},
        name="trustfleet-outbox-worker",
        daemon=True,
    )
    thread.start()
    return RunningWorker(worker, thread, stop_event)
