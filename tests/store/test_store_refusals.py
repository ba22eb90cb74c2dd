"""The rate-limited audit of refusals: a client's first refusal of a window is written, the
rest are counted into one aggregate record; memory and records per window are bounded."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.store import Database
from trustfleet.store.audit import iter_records, verify_chain
from trustfleet.store.refusals import RefusalAudit, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _records(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    with sessions() as session:
        return [
            {"action": r.action, "actor": r.actor, "subject": r.subject, **json.loads(r.details)}
            for r in iter_records(session)
        ]


def _refuse(
    audit: RefusalAudit, client: str, kind: str = "unknown", subject: str = "GET /x"
) -> None:
    audit.refused(
        "auth.failed",
        actor="unauthenticated",
        subject=subject,
        client=client,
        kind=kind,
        details={"reason": kind},
    )


def test_the_first_refusal_is_written_the_rest_counted_into_one_record(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    clock = Clock()
    audit = RefusalAudit(db, window_seconds=60, clients=10, clock=clock, timer=False)
    for i in range(500):
        _refuse(
            audit, "203.0.113.7", kind="unknown" if i % 2 else "expired", subject=f"GET /{i % 3}"
        )
    records = _records(sessions)
    assert records == [
        {
            "action": "auth.failed",
            "actor": "unauthenticated",
            "subject": "GET /0",
            "reason": "expired",
            "client": "203.0.113.7",
        }
    ]
    clock.now += 60  # the window closes; the next refusal writes its aggregate first
    _refuse(audit, "203.0.113.7")
    aggregate, first_of_next = _records(sessions)[1:]
    assert aggregate == {
        "action": "auth.failed",
        "actor": "unauthenticated",
        "subject": "",
        "aggregate": True,
        "client": "203.0.113.7",
        "count": 499,
        "kinds": {"unknown": 250, "expired": 249},
        "subjects": {"GET /1": 167, "GET /2": 166, "GET /0": 166},
        "window_seconds": 60,
    }
    assert first_of_next["reason"] == "unknown" and "aggregate" not in first_of_next
    with sessions() as session:
        assert verify_chain(session).ok


def test_clients_beyond_the_budget_share_one_aggregate(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    """Many addresses cannot buy one record each: past ``clients`` first records a window,
    every refusal is counted against client "*"."""
    clock = Clock()
    audit = RefusalAudit(db, window_seconds=60, clients=5, clock=clock, timer=False)
    for i in range(1000):
        _refuse(audit, f"198.51.{i // 250}.{i % 250}")
        _refuse(audit, f"198.51.{i // 250}.{i % 250}")
    assert len(_records(sessions)) == 5
    audit.close()
    records = _records(sessions)
    assert len(records) == 5 + 5 + 1  # 5 first records, their 5 aggregates, one overflow
    overflow = [r for r in records if r.get("client") == "*"]
    assert [r["count"] for r in overflow] == [2 * 1000 - 2 * 5]
    assert sum(r.get("count", 1) for r in records) == 2000


def test_an_ipv6_host_is_counted_by_its_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("testclient") == "testclient"


def test_the_timer_writes_the_aggregate_when_the_window_closes(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    audit = RefusalAudit(db, window_seconds=0.5, clients=5)
    for _ in range(10):
        _refuse(audit, "192.0.2.9")
    done = threading.Event()
    for _ in range(40):
        if len(_records(sessions)) == 2:
            done.set()
            break
        threading.Event().wait(0.1)
    assert done.is_set(), _records(sessions)
    assert _records(sessions)[1]["count"] == 9
    audit.close()
    assert len(_records(sessions)) == 2  # nothing left to write


def test_refusals_from_many_threads_are_all_counted(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    audit = RefusalAudit(db, window_seconds=3600, clients=3, timer=False)

    def flood(n: int) -> None:
        for _ in range(200):
            _refuse(audit, f"192.0.2.{n}")

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()
    records = _records(sessions)
    assert sum(r.get("count", 1) for r in records) == 8 * 200
    assert len(records) <= 2 * 3 + 1


@pytest.mark.parametrize(("window", "clients"), [(0, 1), (1, 0)])
def test_limits_must_be_positive(db: Database, window: float, clients: int) -> None:
    with pytest.raises(ValueError):
        RefusalAudit(db, window_seconds=window, clients=clients)
