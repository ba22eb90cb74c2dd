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

sys.path.insert(0, str(Path(__file__).parent))

import bench_tmk
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.keysync.imports import BATCH_ROWS, KeyImports, text_lines
from trustfleet.keysync.vault import Vault, key_row_aad
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, make_session_factory, migrate

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
        sessions = make_session_factory(engine)
        keystore = SoftKeyStore(sessions, MasterKeyring([MasterKey.new()]))
        return cls(url, engine, Database(engine), keystore)


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
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
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
# main
# =====================================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_import = sub.add_parser("import")
    p_import.add_argument("--rows", type=int, default=1_000_000)
    p_import.add_argument("--database-url", default="")
    p_import.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.what == "import":
        bench_import(args.rows, args.database_url, args.repeat)


if __name__ == "__main__":
    main()
