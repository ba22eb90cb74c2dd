"""Key-sync benchmarks, each next to its floor measured in the same run.

- ``import``: N key records from CSV through the import use case (what the server's import
  thread runs: parse, validate, fingerprint, seal under the import's DEK, look up, insert in
  batches of 5,000, audit), against the floor: parse the same CSV with ``csv``, seal each
  key with the same AEAD and associated data, insert with ``executemany`` (SQLite) or
  ``COPY`` (PostgreSQL) in the same batches, no application code.
- ``manifest``: N signed manifest lines (one key each) through the same use case, against
  the floor of their cryptography alone (the signature check and the HPKE open).
- ``sync``: key-sync requests as an SMS gateway posts them (signed form in, TwiML out) to
  real uvicorn workers: server CPU per request and requests/s at 1 and 2 workers, against
  the floor: the same HTTP to a do-nothing ASGI app, the requests' own SQL replayed on a
  snapshot, and their cryptography alone.
- ``deliveries``: the outbox worker delivering to the reference receiver on localhost:
  deliveries/s, and the worker's and the receiver's CPU per delivery.

Usage: python bench/bench_keysync.py import --rows 1000000 [--database-url postgresql://...]
       python bench/bench_keysync.py manifest --rows 20000
       python bench/bench_keysync.py sync --requests 3000
       python bench/bench_keysync.py deliveries --messages 2000
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, str(Path(__file__).parent))

import bench_tmk
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.keysync.imports import BATCH_ROWS, KeyImports, text_lines
from trustfleet.keysync.vault import Vault, key_row_aad
from trustfleet.store import Database
from trustfleet.store.engine import _sqlite_pragmas, make_engine, migrate

# =====================================================================================
# import
# =====================================================================================


def write_csv(path: Path, rows: int) -> None:
    """Random 16-hex-digit key IDs (no locality), two keys per terminal, AES-128 keys."""
    with path.open("w") as out:
        out.write("terminal_id,key_id,key\n")
        for i in range(rows):
            out.write(f"T-{i // 2:08d},{secrets.token_hex(8)},{secrets.token_hex(16)}\n")


@dataclass
class Target:
    url: str
    engine: Any
    db: Database
    keystore: SoftKeyStore

    @classmethod
    def fresh(cls, workdir: Path, database_url: str, name: str) -> Target:
        url = (
            bench_tmk.fresh_schema_url(database_url)
            if database_url
            else f"sqlite:///{workdir / (name + '.db')}"
        )
        engine = make_engine(url)
        migrate(engine)
        db = Database(engine)
        keystore = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
        return cls(url, engine, db, keystore)


def ours(
    target: Target, path: Path, import_id: str = "bench"
) -> tuple[float, float, dict[str, int]]:
    """Wall and CPU seconds of the import use case over the file."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    imports = KeyImports(target.db, Vault(target.db, target.keystore))
    wall, cpu = time.perf_counter(), time.process_time()
    with path.open("rb") as handle:
        report = imports.run(
            import_id, "csv", text_lines(handle), content_sha256=digest, actor="bench"
        )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    counts = {"accepted": report.accepted, "unchanged": report.unchanged,
              "rejected": report.rejected}  # fmt: skip
    return wall, cpu, counts


_FLOOR_COLUMNS = (
    "key_id", "terminal_id", "application_id", "label", "algorithm", "sealed_key",
    "import_id", "fingerprint", "last_counter", "created_at",
)  # fmt: skip


def _floor_rows(path: Path, dek: AESGCM, now: str) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for terminal_id, key_id, key in reader:
            nonce = os.urandom(12)
            aad = key_row_aad(key_id, terminal_id, None, "aes-128")
            sealed = nonce + dek.encrypt(nonce, bytes.fromhex(key), aad)
            batch.append((key_id, terminal_id, None, "", "aes-128", sealed, "floor", "", 0, now))
            if len(batch) == BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def floor(target: Target, path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of parse + AEAD + executemany/COPY, no application code."""
    now = datetime.now(UTC).isoformat(sep=" ")
    dek = AESGCM(AESGCM.generate_key(bit_length=256))
    columns = ", ".join(_FLOOR_COLUMNS)
    job = (
        "INSERT INTO keysync_imports (id, format, content_sha256, status, rows_done, accepted,"
        " unchanged, rejected, kek_handle, sealed_dek, created_by, created_at, updated_at)"
        " VALUES ('floor', 'csv', '', 'running', 0, 0, 0, 0, '', %s, '', %s, %s)"
    )
    if target.engine.dialect.name == "sqlite":
        connection = sqlite3.connect(target.engine.url.database, isolation_level=None)
        _sqlite_pragmas(connection, None)  # the app's: WAL, synchronous=NORMAL, foreign keys
        connection.execute(job.replace("%s", "?"), (b"", now, now))
        marks = ", ".join("?" * 10)
        insert = f"INSERT INTO keysync_terminal_keys ({columns}) VALUES ({marks})"  # noqa: S608
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in _floor_rows(path, dek, now):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, batch)
            connection.execute("COMMIT")
        result = time.perf_counter() - wall, time.process_time() - cpu
        connection.close()
        return result
    raw = target.engine.raw_connection()
    try:
        driver = raw.driver_connection
        with driver.cursor() as cursor:
            cursor.execute(job, (b"", now, now))
        driver.commit()
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in _floor_rows(path, dek, now):
            statement = f"COPY keysync_terminal_keys ({columns}) FROM STDIN"
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                for row in batch:
                    copy.write_row(row)
            driver.commit()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        raw.close()


def bench_import(rows: int, database_url: str, repeat: int) -> None:
    """Floor and import alternately, ``repeat`` times each on fresh databases; the best
    time of each (the machine is shared: the best run is the least disturbed one)."""
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-keysync-"))
    floors: list[tuple[float, float]] = []
    runs: list[tuple[float, float]] = []
    try:
        path = workdir / "keys.csv"
        write_csv(path, rows)
        size = path.stat().st_size
        gc.collect()
        gc.freeze()  # as the server does after startup (runner._freeze_startup_objects)
        for attempt in range(repeat):
            floors.append(floor(Target.fresh(workdir, database_url, f"floor{attempt}"), path))
            target = Target.fresh(workdir, database_url, f"ours{attempt}")
            wall, cpu, counts = ours(target, path)
            assert counts == {"accepted": rows, "unchanged": 0, "rejected": 0}, counts
            runs.append((wall, cpu))
            target.engine.dispose()
        again_wall, _, again = ours(target, path, "again")  # the same file: all unchanged
        assert again["unchanged"] == rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    floor_wall, floor_cpu = min(floors)
    wall, cpu = min(runs)
    dialect = "PostgreSQL" if database_url else "SQLite"
    bulk = "COPY" if database_url else "executemany"
    print(f"import of {rows:,} CSV rows ({size / 1e6:.0f} MB), {dialect}, batches of "
          f"{BATCH_ROWS}, best of {repeat}")  # fmt: skip
    print("| | wall s | rows/s | process CPU s |")
    print("|---|---:|---:|---:|")
    print(f"| floor (csv + AEAD + {bulk}) | {floor_wall:.1f} | {rows / floor_wall:,.0f} "
          f"| {floor_cpu:.1f} |")  # fmt: skip
    print(f"| trustfleet import | {wall:.1f} | {rows / wall:,.0f} | {cpu:.1f} |")
    print(f"| the same file again, another import ID (all unchanged) | {again_wall:.1f} "
          f"| {rows / again_wall:,.0f} | |")  # fmt: skip
    print(f"ratio (import time / floor time): {wall / floor_wall:.2f}")
    print("all runs (wall s): floor " + ", ".join(f"{w:.1f}" for w, _ in floors)
          + "; import " + ", ".join(f"{w:.1f}" for w, _ in runs))  # fmt: skip


# =====================================================================================
# manifest
# =====================================================================================


def bench_manifest(rows: int) -> None:
    """Signed manifest lines, one key each: records/s of the import use case, against the
    floor of each line's cryptography alone (an Ed25519 signature check, an HPKE open)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from trustfleet.keysync import protocol
    from trustfleet.keysync.registration import register_manufacturer_key

    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-manifest-"))
    try:
        target = Target.fresh(workdir, "", "manifest")
        vault = Vault(target.db, target.keystore)
        public, private = vault.import_public_key(), vault.import_private_key()
        maker = ed25519.Ed25519PrivateKey.generate()
        pem = maker.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        register_manufacturer_key(
            target.db, kid="m", manufacturer="Maker", public_key_pem=pem.decode(), actor="bench"
        )
        lines = []
        for i in range(rows):
            key_id, key = secrets.token_hex(8), secrets.token_bytes(16)
            sealed = protocol.seal_manifest_key(
                key, import_key=public, kid="m", terminal_id=f"T-{i}", key_id=key_id
            )
            lines.append(
                protocol.sign_manifest_record(
                    maker, kid="m", terminal_id=f"T-{i}",
                    keys=[protocol.ManifestKey(key_id, sealed, algorithm="aes-128")],
                ) + "\n"
            )  # fmt: skip
        path = workdir / "keys.manifest"
        path.write_text("".join(lines))
        gc.collect()
        gc.freeze()
        began = time.process_time()
        for line in lines:  # the floor: the signature check and the HPKE open of each line
            parsed = protocol.split_manifest_line(line)
            protocol.verify_manifest_line(parsed, maker.public_key())
            record = protocol.parse_manifest_payload(parsed.payload)
            protocol.open_manifest_key(
                record.keys[0].sealed_key, import_key=private, kid="m",
                terminal_id=record.terminal_id, key_id=record.keys[0].key_id,
            )  # fmt: skip
        crypto = time.process_time() - began
        imports = KeyImports(target.db, vault)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wall, cpu = time.perf_counter(), time.process_time()
        with path.open("rb") as handle:
            report = imports.run("m", "manifest", text_lines(handle), content_sha256=digest,
                                 actor="bench")  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert report.accepted == rows, report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"signed manifest import, {rows:,} lines (EdDSA, one HPKE-sealed key each), SQLite")
    print("| | s | records/s |")
    print("|---|---:|---:|")
    print(f"| floor: signature check + HPKE open (CPU) | {crypto:.1f} | {rows / crypto:,.0f} |")
    print(f"| trustfleet import (wall; CPU {cpu:.1f} s) | {wall:.1f} | {rows / wall:,.0f} |")
    print(f"ratio (import time / floor): {wall / crypto:.2f}")


# =====================================================================================
# sync
# =====================================================================================

SMS_PATH = "/v1/keysync/sms/gw"
SIGNED_URL = "https://kmp.example" + SMS_PATH
GATEWAY_SECRET = "bench-gateway-auth-token"  # noqa: S105 - a benchmark's
APP = "bench-app"


@dataclass
class SyncFleet:
    env: dict[str, str]
    #: per terminal, its key (hex), key ID and MDN
    terminals: list[tuple[str, str, str]]
    #: what the platform verifies deliveries with (whpk_...)
    verifier: str = ""


def build_sync_fleet(
    workdir: Path, count: int, platform_key: Any = None, platform_url: str = ""
) -> SyncFleet:
    """A data directory with a platform, a gateway and ``count`` terminals imported and
    registered (one key each), set up through the app in process."""
    from cryptography.hazmat.primitives.asymmetric import x25519
    from fastapi.testclient import TestClient

    from trustfleet.keystore.master import create_master_key_file
    from trustfleet.keysync.models import Registration, Subscriber
    from trustfleet.server.auth import bootstrap_admin_token
    from trustfleet.server.runner import app_from_env

    data = workdir / "data"
    data.mkdir()
    create_master_key_file(data / "master.key")
    env = {
        **os.environ,
        "TRUSTFLEET_DATA_DIR": str(data),
        "TRUSTFLEET_DATABASE_URL": f"sqlite:///{data / 'trustfleet.db'}",
        "TRUSTFLEET_MASTER_KEY_FILE": str(data / "master.key"),
        "TRUSTFLEET_LOG_LEVEL": "WARNING",
        "TRUSTFLEET_OUTBOX_WORKER": "0",
    }
    os.environ.update(env)
    app = app_from_env()
    context = app.state.context
    admin = {"Authorization": f"Bearer {bootstrap_admin_token(context.db)}"}
    client = TestClient(app)
    platform_key = platform_key or x25519.X25519PrivateKey.generate()
    pem = platform_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    url = platform_url or "http://127.0.0.1:9/webhook"
    answer = client.put(
        f"/v1/keysync/platforms/{APP}",
        headers=admin,
        json={"url": url, "hpke_public_key_pem": pem.decode()},
    )
    answer.raise_for_status()
    fleet_verifier = answer.json()["verifier"]
    gateway = {"webhook_url": SIGNED_URL, "secret": GATEWAY_SECRET}
    client.put("/v1/keysync/gateways/gw", headers=admin, json=gateway).raise_for_status()
    terminals = [
        (secrets.token_hex(16), secrets.token_hex(8), f"+86144{i:010d}") for i in range(count)
    ]
    rows = "terminal_id,key_id,key,application_id\n" + "".join(
        f"T-{i},{key_id},{key},{APP}\n" for i, (key, key_id, _) in enumerate(terminals)
    )
    maker = client.post("/v1/tokens", headers=admin,
                        json={"name": "m", "role": "manufacturer"}).json()["token"]  # fmt: skip
    upload = {"Authorization": f"Bearer {maker}", "Content-Type": "text/csv"}
    client.put("/v1/keysync/imports/fleet", content=rows, headers=upload).raise_for_status()
    now = datetime.now(UTC)
    with context.db.work() as uow:
        uow.insert_many(Subscriber, [
            {"mdn": mdn, "terminal_id": None, "created_by": "bench", "created_at": now,
             "updated_at": now} for _, _, mdn in terminals])  # fmt: skip
        uow.insert_many(Registration, [
            {"mdn": mdn, "application_id": APP, "created_by": "bench", "created_at": now}
            for _, _, mdn in terminals])  # fmt: skip
    client.close()
    context.engine.dispose()
    return SyncFleet(env, terminals, fleet_verifier)


def sms_posts(fleet: SyncFleet, counter: int, part: slice) -> list[tuple[str, str]]:
    """(form body, X-Twilio-Signature) of each terminal's request with ``counter``."""
    from urllib.parse import urlencode

    from trustfleet.crypto.base import KeyAlgorithm
    from trustfleet.keysync import protocol
    from trustfleet.keysync.sync import twilio_signature

    posts = []
    for key, key_id, mdn in fleet.terminals[part]:
        request = protocol.compose_request(
            bytes.fromhex(key), KeyAlgorithm.AES_128, mdn=mdn, key_id=key_id, counter=counter
        )
        form = [("MessageSid", "SM" + secrets.token_hex(16)), ("AccountSid", "AC" + "0" * 32),
                ("From", mdn), ("To", "+8610690000"), ("Body", request.to_text()),
                ("NumMedia", "0")]  # fmt: skip
        posts.append((urlencode(form), twilio_signature(GATEWAY_SECRET.encode(), SIGNED_URL, form)))
    return posts


def _sms_client(url: str, posts: list[tuple[str, str]], threads: int) -> int:
    """Post the SMS with ``threads`` threads; the number refused."""
    import threading

    import httpx

    failures = 0
    lock = threading.Lock()
    pending = list(posts)

    def work() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    body, signature = pending.pop()
                answer = client.post(SMS_PATH, content=body, headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": signature})  # fmt: skip
                if answer.status_code != 200:
                    with lock:
                        failures += 1
                        if failures <= 3:
                            print(f"  refused: {answer.text[:200]}", file=sys.stderr)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return failures


def serve_sms(fleet: SyncFleet, posts: list[tuple[str, str]], workers: int) -> tuple[float, float]:
    """Server CPU seconds per request and requests/s for ``posts`` against ``workers``
    uvicorn workers, from bench_tmk's two client processes."""
    import multiprocessing

    with bench_tmk.uvicorn_server(bench_tmk.NODE_APP, fleet.env, workers) as (url, pid):
        shares = [posts[i :: bench_tmk.CLIENT_PROCESSES] for i in range(bench_tmk.CLIENT_PROCESSES)]
        before, began = bench_tmk.tree_cpu_seconds(pid), time.perf_counter()
        with multiprocessing.Pool(bench_tmk.CLIENT_PROCESSES) as pool:
            failures = sum(pool.starmap(_sms_client, [(url, share, 4) for share in shares]))
        wall = time.perf_counter() - began
        cpu = bench_tmk.tree_cpu_seconds(pid) - before
    assert failures == 0, f"{failures} requests refused"
    return cpu / len(posts), len(posts) / wall


def sync_crypto_seconds() -> float:
    """The cryptography of one request alone: the gateway's HMAC-SHA1, the DEK's and the
    key's AES-GCM opens, the request MAC (HKDF + HMAC-SHA256), the HPKE seal of the
    delivery and the audit record's SHA-256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as pyca_hmac
    from cryptography.hazmat.primitives.asymmetric import x25519

    from trustfleet.crypto import get_suite
    from trustfleet.crypto.base import KeyAlgorithm
    from trustfleet.keysync import protocol

    secret, data = GATEWAY_SECRET.encode(), b"x" * 260

    def gateway() -> bytes:
        mac = pyca_hmac.HMAC(secret, hashes.SHA1())  # noqa: S303 - the gateway's scheme
        mac.update(data)
        return mac.finalize()

    kek = AESGCM(AESGCM.generate_key(bit_length=256))
    sealed_dek = kek.encrypt(b"n" * 12, b"d" * 32, b"info")
    dek = AESGCM(AESGCM.generate_key(bit_length=256))
    sealed_key = dek.encrypt(b"n" * 12, b"k" * 16, b"a" * 60)
    key = b"k" * 16
    request = protocol.compose_request(key, KeyAlgorithm.AES_128, mdn="+8614400000000001",
                                       key_id="k" * 16, counter=1)  # fmt: skip
    platform = x25519.X25519PrivateKey.generate().public_key()
    delivery = protocol.KeyDelivery("+8614400000000001", "k" * 16, key, APP, "aes-128")
    suite = get_suite("p256")
    audit_record = b"a" * 400
    parts = [
        gateway,
        lambda: kek.decrypt(b"n" * 12, sealed_dek, b"info"),
        lambda: dek.decrypt(b"n" * 12, sealed_key, b"a" * 60),
        lambda: protocol.verify_request(request, key, KeyAlgorithm.AES_128, "+8614400000000001"),
        lambda: protocol.seal_delivery(
            delivery, platform_key=platform, delivery_id="msg_x", timestamp=1
        ),
        lambda: suite.hash(audit_record),
    ]
    return sum(bench_tmk._per_op(part) for part in parts)


def sync_database_seconds(fleet: SyncFleet, posts: list[tuple[str, str]]) -> tuple[float, int]:
    """The requests' own SQL, captured while they run through the app in process and
    replayed on a snapshot of the database taken just before them: seconds per request
    and statements per request."""
    from fastapi.testclient import TestClient

    import bench_tmk_floor
    from trustfleet.server.runner import app_from_env

    log = bench_tmk_floor.StatementLog()
    log.install()
    os.environ.update(fleet.env)
    app = app_from_env()
    client = TestClient(app)
    engine = app.state.context.engine
    copy = Path(engine.url.database).with_name("snapshot.db")
    bench_tmk_floor.snapshot(Path(engine.url.database), copy)
    log.on = True
    for body, signature in posts:
        client.post(SMS_PATH, content=body, headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature}).raise_for_status()  # fmt: skip
    log.on = False
    seconds = bench_tmk_floor.replay_seconds(copy, log.statements)
    client.close()
    engine.dispose()
    return seconds / len(posts), len(log.statements) // len(posts)


def bench_sync(requests: int) -> None:
    import bench_tmk_floor

    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-sync-"))
    try:
        fleet = build_sync_fleet(workdir, requests + 300)
        captured = sms_posts(fleet, 1, slice(requests, requests + 300))
        database, statements = sync_database_seconds(fleet, captured)
        results = {}
        for workers, counter in ((1, 1), (2, 2)):
            posts = sms_posts(fleet, counter, slice(0, requests))
            results[workers] = serve_sms(fleet, posts, workers)
        body, _ = captured[0]
        http = bench_tmk_floor.http_seconds_per_request(2000, len(body), 62)
        crypto = sync_crypto_seconds()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    floor_seconds = http + database + crypto
    print(f"key-sync requests by SMS webhook (signed form in, binding + outbox row), SQLite, "
          f"{requests} requests per run")  # fmt: skip
    print("| part | ms/request |")
    print("|---|---:|")
    print(f"| http (do-nothing ASGI app, same sizes) | {1000 * http:.3f} |")
    print(f"| database ({statements} statements replayed) | {1000 * database:.3f} |")
    print(f"| crypto-only | {1000 * crypto:.3f} |")
    print(f"| floor = http + database + crypto | {1000 * floor_seconds:.3f} |")
    for workers, (cpu, rate) in results.items():
        print(f"| server CPU, {workers} worker(s) ({rate:,.0f} requests/s) | {1000 * cpu:.3f} |")
    print(f"ratio server CPU (1 worker) / floor: {results[1][0] / floor_seconds:.2f}")


# =====================================================================================
# deliveries
# =====================================================================================


def _delivered(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        found = connection.execute(
            "SELECT count(*) FROM outbox_messages WHERE status = 'delivered'"
        ).fetchone()
    return int(found[0])


def bench_deliveries(messages: int) -> None:
    """``trustfleet worker`` delivering ``messages`` queued keys to ``trustfleet
    platform-receiver`` on localhost (both real processes): deliveries/s, and each
    process's CPU per delivery (from the first delivery to the last, so start-up is not
    counted)."""
    import subprocess

    import httpx
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    from fastapi.testclient import TestClient

    from trustfleet.server.runner import app_from_env

    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-deliveries-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        port = bench_tmk._free_port()
        platform_key = x25519.X25519PrivateKey.generate()
        fleet = build_sync_fleet(workdir, messages, platform_key,
                                 f"http://127.0.0.1:{port}/webhook")  # fmt: skip
        os.environ.update(fleet.env)
        app = app_from_env()
        with TestClient(app) as client:
            for body, signature in sms_posts(fleet, 1, slice(0, messages)):
                client.post(SMS_PATH, content=body, headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": signature}).raise_for_status()  # fmt: skip
        app.state.context.engine.dispose()
        receiver_dir = workdir / "receiver"
        receiver_dir.mkdir()
        (receiver_dir / "hpke.pem").write_bytes(
            platform_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
        cli = [sys.executable, "-m", "trustfleet.cli"]
        env = {**fleet.env, "TRUSTFLEET_WEBHOOK_VERIFIER": fleet.verifier}
        receiver = subprocess.Popen(
            [*cli, "platform-receiver", "run", "--app", APP, "--dir", str(receiver_dir),
             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(receiver)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        worker = subprocess.Popen([*cli, "worker"], env=env, stdout=subprocess.DEVNULL)
        processes.append(worker)
        database = Path(fleet.env["TRUSTFLEET_DATA_DIR"]) / "trustfleet.db"
        while _delivered(database) == 0:
            time.sleep(0.005)
        start = time.perf_counter()
        cpu0 = bench_tmk.tree_cpu_seconds(worker.pid), bench_tmk.tree_cpu_seconds(receiver.pid)
        done0 = _delivered(database)
        while (done := _delivered(database)) < messages:
            time.sleep(0.02)
        wall = time.perf_counter() - start
        cpu = (
            bench_tmk.tree_cpu_seconds(worker.pid) - cpu0[0],
            bench_tmk.tree_cpu_seconds(receiver.pid) - cpu0[1],
        )
        counted = done - done0
        stored = (
            sqlite3.connect(receiver_dir / "keys.db")
            .execute("SELECT count(*) FROM deliveries")
            .fetchone()[0]
        )
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    assert stored == messages, stored
    print(f"deliveries: trustfleet worker -> platform-receiver on localhost, {messages} keys,"
          " v1a (Ed25519) signatures, HPKE X25519 payloads, SQLite")  # fmt: skip
    print("| | value |")
    print("|---|---:|")
    print(f"| deliveries/s | {counted / wall:,.0f} |")
    print(f"| worker CPU per delivery | {1000 * cpu[0] / counted:.2f} ms |")
    print(f"| receiver CPU per delivery | {1000 * cpu[1] / counted:.2f} ms |")


# =====================================================================================
# main
# =====================================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_import = sub.add_parser("import")
    p_import.add_argument("--rows", type=int, default=1_000_000)
    p_import.add_argument("--database-url", default="")
    p_import.add_argument("--repeat", type=int, default=3)
    p_manifest = sub.add_parser("manifest")
    p_manifest.add_argument("--rows", type=int, default=20_000)
    p_sync = sub.add_parser("sync")
    p_sync.add_argument("--requests", type=int, default=3000)
    p_deliveries = sub.add_parser("deliveries")
    p_deliveries.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "deliveries":
        bench_deliveries(args.messages)
    if args.what == "sync":
        bench_sync(args.requests)
    if args.what == "manifest":
        bench_manifest(args.rows)
    if args.what == "import":
        bench_import(args.rows, args.database_url, args.repeat)


if __name__ == "__main__":
    main()
