"""The spine's outbox on its own: generic destinations and payloads, the retry schedule,
dead letters, and several workers sharing the queue without claiming a message twice."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, select

from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.kit.outbox import DeliveryWorker, Outbox, enqueue, make_signing_key, put_destination
from trustfleet.kit.outbox.models import OutboxMessage
from trustfleet.kit.outbox.service import parse_schedule
from trustfleet.kit.outbox.webhooks import Verifier, decode_secret
from trustfleet.store import Database


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def keystore(db: Database) -> SoftKeyStore:
    return SoftKeyStore(db, MasterKeyring([MasterKey.new()]))


def add_destination(db: Database, keystore: SoftKeyStore, name: str, now: datetime) -> str:
    key = make_signing_key(keystore, "v1")
    with db.work() as uow:
        put_destination(uow, keystore, name=name, url="http://receiver.test/hook", key=key, now=now)
    return key.verifier


def enqueue_many(db: Database, destination: str, n: int, now: datetime) -> list[str]:
    with db.work() as uow:
        return [
            enqueue(uow, destination=destination, event_type="test.event",
                    payload=b'{"n":%d}' % i, now=now)
            for i in range(n)
        ]  # fmt: skip


def test_retry_schedule_then_dead_letter_with_a_mock_transport(
    db: Database, keystore: SoftKeyStore
) -> None:
    clock = Clock()
    verifier = Verifier(secret=decode_secret(add_destination(db, keystore, "t:1", clock.now)))
    (message_id,) = enqueue_many(db, "t:1", 1, clock.now)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert verifier.verify(request.content, request.headers, clock.now) == message_id
        return httpx.Response(503)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    worker = DeliveryWorker(db, keystore, schedule=(0, 5, 300), client=client, clock=clock)
    assert worker.run_once() == 1
    assert worker.run_once() == 0  # the next attempt is 5 s away
    clock.now += timedelta(seconds=5)
    assert worker.run_once() == 1
    clock.now += timedelta(seconds=299)
    assert worker.run_once() == 0
    clock.now += timedelta(seconds=1)
    assert worker.run_once() == 1
    view = Outbox(db, clock=clock).message(message_id)
    assert (view.status, view.attempts, view.last_error) == ("dead", 3, "HTTP 503")
    assert {r.headers["webhook-id"] for r in seen} == {message_id}


def test_the_default_schedule_is_standard_webhooks() -> None:
    assert parse_schedule("0,5,300,1800,7200,18000,36000,36000") == (
        0, 5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600,
    )  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017
        parse_schedule("1,-2")


def test_nothing_is_queued_when_the_unit_of_work_rolls_back(
    db: Database, keystore: SoftKeyStore, engine: Engine
) -> None:
    clock = Clock()
    add_destination(db, keystore, "t:2", clock.now)
    with pytest.raises(RuntimeError), db.work() as uow:
        enqueue(uow, destination="t:2", event_type="x", payload=b"{}", now=clock.now)
        raise RuntimeError
    with engine.connect() as connection:
        assert connection.execute(select(OutboxMessage.id)).all() == []


def test_workers_never_claim_the_same_message(
    db: Database, keystore: SoftKeyStore, engine: Engine
) -> None:
    clock = Clock()
    add_destination(db, keystore, "t:3", clock.now)
    ids = enqueue_many(db, "t:3", 60, clock.now)
    workers = [DeliveryWorker(db, keystore, batch=7, clock=clock) for _ in range(3)]
    claimed: list[list[str]] = [[] for _ in workers]
    start = threading.Barrier(len(workers))

    def claim(index: int) -> None:
        start.wait()
        while batch := workers[index].claim():
            claimed[index] += [m.id for m in batch]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [m for batch in claimed for m in batch]
    assert sorted(every) == sorted(ids)  # each claimed exactly once
    if engine.dialect.name == "postgresql":
        assert sum(1 for batch in claimed if batch) >= 2  # they really shared the work
