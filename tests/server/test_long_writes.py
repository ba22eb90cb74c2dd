"""A long write never takes the server down (issue 12).

Bulk work commits in bounded batches; a write waits its turn for another writer up to
``WRITE_WAIT_SECONDS`` and then answers 503 ``database-busy`` with ``Retry-After`` (never
500 ``database is locked``); nothing waits for the database on the event loop (on SQLite,
hot work that finds the write lock taken runs again in a thread), so ``/healthz`` and
``/metrics`` answer throughout; the token's last-used refresh never fails a request.

The slow test runs large imports on real server processes (one node on SQLite, two on
PostgreSQL; two terminal imports and a key-sync import at once) while terminals download,
operators rotate TMKs, admins make tokens and a separate process probes ``/healthz``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from harness import admin_token_for, node_environment, running_nodes
from trustfleet.server.app import create_app
from trustfleet.server.auth import authenticate, create_token
from trustfleet.server.context import AppContext
from trustfleet.server.deps import run_database_work
from trustfleet.server.models import ApiToken
from trustfleet.store import Database, DatabaseBusy, WriteLockBusy
from trustfleet.store import engine as store_engine
from trustfleet.store.audit import AuditRecord
from trustfleet.store.engine import make_engine
from trustfleet.tmk.errors import TmkServerRefused
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

from . import toy_device_domain as toy
from .conftest import assert_problem, bearer

# -- holding the write lock ----------------------------------------------------------------


def _sqlite_path(engine: Engine) -> str:
    database = engine.url.database
    assert database
    return database


@pytest.fixture
def sqlite_only(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's database-wide write lock")


def _hold_sqlite_lock(engine: Engine, seconds: float) -> threading.Thread:
    """Another writer (its own connection) holding SQLite's write lock for ``seconds``;
    returns once it holds it."""
    held = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(_sqlite_path(engine), isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            held.set()
            time.sleep(seconds)
            connection.execute("COMMIT")
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    return holder


def _last_used(db: Database, token_id: int) -> Any:
    statement = select(ApiToken.last_used_at).where(ApiToken.id == token_id)
    return db.read(lambda reads: reads.scalar(statement))


def test_work_on_the_event_loop_runs_again_in_a_thread_when_the_lock_is_taken(
    context: AppContext, sqlite_only: None
) -> None:
    """A use case run by run_database_work while another writer holds the lock neither
    fails nor stops the event loop: it completes once the lock is free, and the loop kept
    ticking meanwhile."""
    db = context.db

    def use_case() -> str:
        with db.work() as uow:
            uow.audit("test.wrote", actor="test")
        return "done"

    async def scenario() -> tuple[str, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        result = await run_database_work(context, use_case)
        stop.set()
        await ticking
        return result, max(gaps)

    holder = _hold_sqlite_lock(context.engine, 0.6)
    began = time.perf_counter()
    result, worst_gap = asyncio.run(scenario())
    holder.join()
    assert result == "done"
    assert time.perf_counter() - began >= 0.5  # it waited for the other writer...
    assert worst_gap < 0.45  # ...in a thread, never on the loop (it would stall 0.6 s)


def test_without_waiting_fails_before_writing_and_waits_once_something_committed(
    db: Database, engine: Engine, sqlite_only: None
) -> None:
    holder = _hold_sqlite_lock(engine, 0.5)
    try:
        with db.without_waiting(), pytest.raises(WriteLockBusy), db.work() as uow:
            uow.audit("test.never", actor="test")
    finally:
        holder.join()
    with db.without_waiting():
        with db.work() as uow:
            uow.audit("test.first", actor="test")
        holder = _hold_sqlite_lock(engine, 0.3)
        with db.work() as uow:  # after a commit: waits its turn (a rerun would repeat it)
            uow.audit("test.second", actor="test")
        holder.join()
    statement = select(AuditRecord.action).order_by(AuditRecord.seq)
    actions = db.read(lambda reads: reads.all(statement))
    assert [row[0] for row in actions] == ["test.first", "test.second"]


def test_the_last_used_refresh_never_fails_or_delays_a_request(
    db: Database, engine: Engine, sqlite_only: None
) -> None:
    token, info = create_token(db, "busy reader", "operator")
    holder = _hold_sqlite_lock(engine, 1.5)
    try:
        began = time.perf_counter()
        principal = authenticate(db, token)  # the refresh is due: first use
        assert time.perf_counter() - began < 0.5
    finally:
        holder.join()
    assert principal.token_id == info.id
    assert _last_used(db, info.id) is None  # skipped, not waited for
    authenticate(db, token)
    assert _last_used(db, info.id) is not None  # made by the next request


def test_a_write_that_waits_past_the_bound_is_database_busy(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's busy timeout and PostgreSQL's lock timeout are the stated bound; past it a
    write fails with DatabaseBusy (503 database-busy), not a driver error."""
    monkeypatch.setattr(store_engine, "WRITE_WAIT_SECONDS", 1)
    engine = make_engine(database_url)
    try:
        store_engine.migrate(engine)
        db = Database(engine)
        _, info = create_token(db, "locked", "operator")
        if engine.dialect.name == "sqlite":
            holder = _hold_sqlite_lock(engine, 2.5)
            release: Callable[[], None] = holder.join
        else:
            other = engine.connect()
            transaction = other.begin()
            other.execute(select(ApiToken.id).where(ApiToken.id == info.id).with_for_update())

            def release() -> None:
                transaction.rollback()
                other.close()

        began = time.perf_counter()
        try:
            with pytest.raises(DatabaseBusy) as raised, db.work() as uow:
                uow.run(update(ApiToken).where(ApiToken.id == info.id).values(name="x"))
            waited = time.perf_counter() - began
        finally:
            release()
        assert 0.9 <= waited < 2.4
        assert raised.value.code == "database-busy" and raised.value.status == 503
    finally:
        engine.dispose()


def test_database_busy_answers_503_with_retry_after_on_both_lanes(
    context: AppContext, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    domains = (toy.__name__, "trustfleet.server.api")
    for lane in (True, False):
        app = create_app(context, domain_routers=domains, device_lane=lane)
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post(
                "/v1/toy/echo/abc", content=b"busy", headers=bearer(tokens["operator"])
            )
        assert_problem(response, 503, "database-busy")
        assert response.headers["retry-after"] == "1"
    busy = [r for r in caplog.records if "database-busy" in r.getMessage()]
    assert busy and all(r.levelname == "WARNING" and r.exc_info is None for r in busy)


# -- a large import while the fleet keeps working (real server processes) --------------------

#: rows imported in the slow test (two files at once); TRUSTFLEET_LONG_WRITE_ROWS overrides
ROWS = int(os.environ.get("TRUSTFLEET_LONG_WRITE_ROWS", "100000"))
#: key-sync keys imported at the same time (the other capability's bulk import)
KEYS = ROWS // 2
DOWNLOADERS = 3
#: a generous bound on a health answer on a loaded CI machine (the target, 100 ms, and the
#: measured distribution are in bench/RESULTS.md); before batching it stalled for seconds
HEALTH_BOUND_SECONDS = 1.0
PROBE_INTERVAL = 0.05

_PROBE = """
import json, sys, threading, time, httpx
url, out = sys.argv[1], sys.argv[2]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
samples = []
with httpx.Client(timeout=30) as client:
    while not stop.is_set():
        for path in ("/healthz", "/healthz", "/healthz", "/metrics"):
            began = time.perf_counter()
            status = client.get(url + path).status_code
            samples.append([path, status, time.perf_counter() - began])
            time.sleep(0.05)
open(out, "w").write(json.dumps(samples))
"""


def _probe(url: str, out: Path) -> subprocess.Popen[str]:
    """``/healthz`` (and ``/metrics``) probed from another process until its stdin closes:
    the test process's own threads (terminals doing crypto) cannot skew the timings."""
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE, url, str(out)], stdin=subprocess.PIPE, text=True
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bulk(public_key: str, prefix: str, count: int) -> bytes:
    return b"".join(
        json.dumps({"sn": f"{prefix}-{i:07d}", "public_key": public_key}).encode() + b"\n"
        for i in range(count)
    )


def _post_json(client: httpx.Client, path: str, token: str, body: Any = None) -> httpx.Response:
    return client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.slow
def test_a_large_import_never_takes_the_server_down(tmp_path: Path, database_url: str) -> None:
    postgres = database_url.startswith("postgresql")
    admin = admin_token_for(database_url)
    env = node_environment(database_url, tmp_path)
    with running_nodes(env, tmp_path, count=2 if postgres else 1) as nodes:
        clients = [httpx.Client(base_url=node.url, timeout=60) for node in nodes]
        first = clients[0]
        tokens = {
            role: _post_json(first, "/v1/tokens", admin, {"name": role, "role": role}).json()[
                "token"
            ]
            for role in ("manufacturer", "device-gateway", "operator")
        }
        root = _post_json(first, "/v1/tmk/identity", admin).json()["ksrcrt_pem"]
        terminals = []
        for i in range(DOWNLOADERS):
            directory = tmp_path / f"pos-{i}"
            PosTerminal.factory(directory, f"POS-{i}", root_pem=root.encode())
            terminals.append(PosTerminal.open(directory))
        ndjson = {
            "Authorization": f"Bearer {tokens['manufacturer']}",
            "Content-Type": "application/x-ndjson",
        }
        records = b"".join((t.directory / "record.ndjson").read_bytes() for t in terminals)
        assert first.post("/v1/tmk/terminals/import", content=records, headers=ndjson).json()[
            "accepted"
        ] == len(terminals)
        public_key = json.loads(records.splitlines()[0])["public_key"]
        files = [
            _bulk(public_key, "BULK-A", ROWS // 2),
            _bulk(public_key, "BULK-B", ROWS - ROWS // 2),
        ]

        keys_csv = "terminal_id,key_id,key\n" + "".join(
            f"T-{i // 2},{secrets.token_hex(8)},{secrets.token_hex(16)}\n" for i in range(KEYS)
        )
        importing = threading.Event()
        finished = threading.Event()
        failures: list[str] = []
        downloads: list[tuple[float, bool]] = []  # (seconds, during the import)
        token_calls: list[tuple[int, float]] = []
        import_seconds: list[float] = []

        def run_import(index: int) -> httpx.Response:
            client = clients[index % len(clients)]
            began = time.perf_counter()
            answer = client.post("/v1/tmk/terminals/import", content=files[index], headers=ndjson)
            import_seconds.append(time.perf_counter() - began)
            return answer

        def run_key_import() -> httpx.Response:
            headers = {**ndjson, "Content-Type": "text/csv"}
            began = time.perf_counter()
            answer = clients[-1].put(
                "/v1/keysync/imports/long-write", content=keys_csv.encode(), headers=headers
            )
            import_seconds.append(time.perf_counter() - began)
            return answer

        def download_loop(index: int) -> None:
            terminal, client = terminals[index], clients[index % len(clients)]
            transport = HttpTransport(client, tokens["device-gateway"])
            rounds = 0
            importing.wait(30)
            while rounds < 2 or not finished.is_set():
                began = time.perf_counter()
                try:
                    result = terminal.download(transport)
                except TmkServerRefused as exc:
                    failures.append(f"download {terminal.sn}: {exc.status} {exc.code}")
                    return
                if result.kcv != terminal.scm.tmk_kcv:
                    failures.append(f"download {terminal.sn}: KCV mismatch")
                downloads.append((time.perf_counter() - began, not finished.is_set()))
                rounds += 1
                path = f"/v1/tmk/terminals/{terminal.sn}/rotate-tmk"
                rotated = _post_json(client, path, tokens["operator"])
                if rotated.status_code != 200:
                    failures.append(f"rotate-tmk {terminal.sn}: {rotated.status_code}")
                    return

        def token_loop() -> None:
            importing.wait(30)
            n = 0
            while n < 5 or not finished.is_set():
                client = clients[n % len(clients)]
                body = {"name": f"load {n}", "role": "auditor"}
                began = time.perf_counter()
                made = _post_json(client, "/v1/tokens", admin, body)
                token_calls.append((made.status_code, time.perf_counter() - began))
                if made.status_code != 201:
                    failures.append(f"token create: {made.status_code} {made.text[:200]}")
                    return
                who = client.get("/v1/whoami", headers=bearer(made.json()["token"]))
                if who.status_code != 200:
                    failures.append(f"whoami: {who.status_code}")
                n += 1
                time.sleep(0.2)

        probe_out = tmp_path / "probe.json"
        probe = _probe(nodes[0].url, probe_out)
        try:
            with ThreadPoolExecutor(max_workers=DOWNLOADERS + 4) as pool:
                workers = [pool.submit(download_loop, i) for i in range(DOWNLOADERS)]
                workers.append(pool.submit(token_loop))
                imports = [pool.submit(run_import, i) for i in range(2)]
                key_import = pool.submit(run_key_import)
                importing.set()
                answers = [future.result(timeout=600) for future in imports]
                keys_answer = key_import.result(timeout=600)
                finished.set()
                for worker in workers:
                    worker.result(timeout=120)
        finally:
            finished.set()
            assert probe.stdin is not None
            probe.stdin.close()
            probe.wait(timeout=60)
            for client in clients:
                client.close()

    for answer in answers:
        assert answer.status_code == 200, answer.text[:500]
    assert sum(answer.json()["accepted"] for answer in answers) == ROWS
    assert keys_answer.status_code in (200, 201), keys_answer.text[:500]
    assert keys_answer.json()["accepted"] == KEYS
    assert failures == []
    during = [seconds for seconds, in_import in downloads if in_import]
    assert len(during) >= DOWNLOADERS, "the terminals downloaded while the import ran"
    samples = json.loads(probe_out.read_text())
    assert samples and all(status == 200 for _, status, _ in samples)
    health = [seconds for path, _, seconds in samples if path == "/healthz"]
    metrics = [seconds for path, _, seconds in samples if path == "/metrics"]
    report = {
        "database": "postgresql" if postgres else "sqlite",
        "rows": ROWS,
        "keys": KEYS,
        "import_seconds": [round(s, 2) for s in import_seconds],
        "health": _summary(health),
        "metrics": _summary(metrics),
        "downloads_during_import": _summary(during),
        "token_creates": _summary([seconds for _, seconds in token_calls]),
    }
    print("\nlong-write figures:", json.dumps(report))
    assert max(health) < HEALTH_BOUND_SECONDS, report
    assert max(metrics) < HEALTH_BOUND_SECONDS, report


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 1),
        "p99_ms": round(_percentile(values, 0.99) * 1e3, 1),
        "max_ms": round(max(values) * 1e3, 1),
    }
