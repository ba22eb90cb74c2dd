"""The floor under the TMK download benchmark: what one download costs the server before any
of trustfleet's own Python runs, measured in one run on this machine.

bench_tmk.py reports the server's CPU per download and its ratio to the crypto-only cost.
This script splits that figure into what the design cannot avoid and what is trustfleet's
own code, so that the ratio's ceiling is measured rather than guessed:

- http: three requests answered by a do-nothing ASGI app under the same uvicorn setup
  (httptools, uvloop), with the download's real request and response sizes and headers;
- database: the very SQL statements of real downloads (captured with SQLite's trace
  callback while downloads run through the app in process, by FastAPI's TestClient),
  replayed with bound parameters on a snapshot of the database taken just before them,
  with the app's pragmas;
- crypto: the server-side cryptography of one download (bench_tmk.crypto_only_seconds);
- server: bench_tmk's figure for the same suite, one worker, measured in the same run.

floor = http + database + crypto is the server CPU of a download whose Python glue costs
nothing; crypto / floor is the best ratio the design can reach; glue = server - floor is
what trustfleet's own Python costs now. (The app's CPU in process is not used for the glue:
there the terminal's work shares the interpreter, its garbage collections included.)

With ``--keystores soft pkcs11`` the split is made for each key store (the PKCS#11 backend on
a SoftHSM2 token: its crypto-only part is the same operations done where that store does
them, bench_tmk.crypto_only_pkcs11_seconds), and the ratio pkcs11 ÷ soft of the server CPU
and of the floor is printed.

Usage: python bench/bench_tmk_floor.py [--downloads 300] [--requests 6000]
                                       [--keystores soft pkcs11]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.pool import Pool

import bench_tmk  # the sibling benchmark (on sys.path as the script's folder)
from trustfleet.store.engine import _sqlite_pragmas
from trustfleet.tmk.terminal import HttpTransport, PosTerminal, Transport

WARMUP = 20
#: a text or blob literal (whole, so digits inside it are its own), or an integer
_LITERAL = re.compile(r"([xX])?'((?:[^']|'')*)'|(?<![\w.])(-?\d+)(?![\w.])")


# -- the downloads' sizes ------------------------------------------------------------------


@dataclass
class CountingTransport:
    """A terminal transport that counts the requests and the bytes both ways."""

    inner: Transport
    requests: int = 0
    request_bytes: int = 0
    response_bytes: int = 0

    def post(self, path: str, body: bytes) -> bytes:
        return self._counted(body, self.inner.post(path, body))

    def get(self, path: str) -> bytes:
        return self._counted(b"", self.inner.get(path))

    def _counted(self, sent: bytes, answer: bytes) -> bytes:
        self.requests += 1
        self.request_bytes += len(sent)
        self.response_bytes += len(answer)
        return answer


# -- the database ------------------------------------------------------------------------


@dataclass
class StatementLog:
    """Every statement any pooled SQLite connection runs while ``on`` (expanded SQL)."""

    on: bool = False
    statements: list[str] = field(default_factory=list)
    installed: bool = False

    def install(self) -> None:
        if self.installed:
            return
        self.installed = True

        def traced(dbapi_connection: Any, _record: Any) -> None:
            if isinstance(dbapi_connection, sqlite3.Connection):
                dbapi_connection.set_trace_callback(self._record)

        event.listen(Pool, "connect", traced)

    def _record(self, sql: str) -> None:
        if self.on:
            self.statements.append(sql)


def bound(sql: str) -> tuple[str, list[Any]]:
    """An expanded statement with its literals (text, blob, integer) as bound parameters
    again, so that the replay, like the app, prepares each distinct statement once."""
    values: list[Any] = []

    def parameter(found: re.Match[str]) -> str:
        blob, text, number = found.groups()
        if number is not None:
            values.append(int(number))
        else:
            values.append(bytes.fromhex(text) if blob else text.replace("''", "'"))
        return "?"

    return _LITERAL.sub(parameter, sql), values


def snapshot(database: Path, copy: Path) -> None:
    with sqlite3.connect(database) as source, sqlite3.connect(copy) as target:
        source.backup(target)


def replay_seconds(copy: Path, statements: list[str]) -> float:
    """CPU seconds to run ``statements`` again on ``copy``, on a connection set up as the
    app's are."""
    prepared = [bound(sql) for sql in statements]
    connection = sqlite3.connect(copy, isolation_level=None, check_same_thread=False)
    _sqlite_pragmas(connection, None)
    try:
        began = time.process_time()
        for sql, values in prepared:
            cursor = connection.execute(sql, values)
            cursor.fetchall()
            cursor.close()
        return time.process_time() - began
    finally:
        connection.close()


# -- HTTP alone --------------------------------------------------------------------------


def _json_of_size(size: int) -> bytes:
    return b'{"x":"' + b"x" * max(0, size - 8) + b'"}'


async def floor_app(scope: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
    """A do-nothing ASGI app: reads the body, answers FLOOR_RESPONSE_BYTES of JSON."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = _json_of_size(int(os.environ["FLOOR_RESPONSE_BYTES"]))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client(url: str, count: int, request_bytes: int) -> None:
    body = _json_of_size(request_bytes)
    headers = {"Authorization": "Bearer tf_" + "x" * 43, "Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            client.post("/v1/tmk/downloads", content=body, headers=headers).raise_for_status()


def http_seconds_per_request(requests: int, request_bytes: int, response_bytes: int) -> float:
    """Server CPU per request of :func:`floor_app` under uvicorn, loaded as bench_tmk loads
    the real server (two client processes on the same cores)."""
    app = ["bench_tmk_floor:floor_app", "--app-dir", str(Path(__file__).parent)]
    env = {**os.environ, "FLOOR_RESPONSE_BYTES": str(response_bytes)}
    with bench_tmk.uvicorn_server(app, env) as (url, pid):
        _client(url, 200, request_bytes)  # warm-up
        share = requests // bench_tmk.CLIENT_PROCESSES
        before = bench_tmk.tree_cpu_seconds(pid)
        with multiprocessing.Pool(bench_tmk.CLIENT_PROCESSES) as pool:
            jobs = [
                pool.apply_async(_client, (url, share, request_bytes))
                for _ in range(bench_tmk.CLIENT_PROCESSES)
            ]
            for job in jobs:
                job.get()
        cpu = bench_tmk.tree_cpu_seconds(pid) - before
    return cpu / (share * bench_tmk.CLIENT_PROCESSES)


# -- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    downloads: int
    database: float
    statements: int
    exchange: CountingTransport


_LOG = StatementLog()


def split_in_process(workdir: Path, downloads: int, keystore: str = "soft") -> Split:
    """Real downloads through the app in process, their SQL captured and replayed."""
    log = _LOG
    log.install()
    log.statements.clear()
    fleet = bench_tmk.build_fleet(workdir, "p256", WARMUP + downloads, "", keystore)
    saved = dict(os.environ)
    os.environ.update(fleet.env)
    from trustfleet.server.runner import app_from_env

    try:
        server = app_from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    app = HttpTransport(TestClient(server), fleet.gateway_token)
    for directory in fleet.terminal_dirs[:WARMUP]:
        PosTerminal.open(directory).download(app)
    engine = server.state.context.engine
    assert engine.dialect.name == "sqlite", "the floor is measured on SQLite"
    copy = workdir / "snapshot.db"
    snapshot(Path(engine.url.database), copy)
    exchange = CountingTransport(app)
    log.on = True
    for directory in fleet.terminal_dirs[WARMUP:]:
        PosTerminal.open(directory).download(exchange)
    log.on = False
    database_cpu = replay_seconds(copy, log.statements)
    close = getattr(server.state.context.keystore, "close", None)
    if close is not None:
        close()
    return Split(downloads, database_cpu, len(log.statements), exchange)


def floor_of(keystore: str, downloads: int, requests: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-floor-"))
    try:
        split = split_in_process(workdir, downloads, keystore)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n, exchange = split.downloads, split.exchange
    per_request = exchange.requests / n
    http = per_request * http_seconds_per_request(
        requests,
        exchange.request_bytes // exchange.requests,
        exchange.response_bytes // exchange.requests,
    )
    crypto = bench_tmk.crypto_seconds("p256", keystore)
    server = (
        bench_tmk.measure("p256", 1, terminals=downloads, keystore=keystore).cpu_ms_per_download
        / 1000
    )
    database = split.database / n
    floor = http + database + crypto
    rows = {
        "http (do-nothing ASGI app, same requests)": http,
        f"database ({split.statements / n:.0f} statements replayed)": database,
        "crypto-only": crypto,
        "floor = http + database + crypto": floor,
        "server over HTTP (bench_tmk, 1 worker)": server,
        "glue = server - floor": server - floor,
    }
    print(f"p256, SQLite, key store {keystore}, {n} downloads, {per_request:.0f} requests each")
    print("| part | ms/download |")
    print("|---|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {1000 * seconds:.3f} |")
    print(f"ratio ceiling crypto / floor: {crypto / floor:.2f}", flush=True)
    return {"server": server, "floor": floor, "crypto": crypto}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--downloads", type=int, default=300)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--keystores", nargs="+", default=["soft"], choices=bench_tmk.KEYSTORES)
    args = parser.parse_args()
    results = {k: floor_of(k, args.downloads, args.requests) for k in args.keystores}
    if {"soft", "pkcs11"} <= set(results):
        soft, hsm = results["soft"], results["pkcs11"]
        print(
            f"pkcs11 / soft: server CPU {hsm['server'] / soft['server']:.2f},"
            f" floor {hsm['floor'] / soft['floor']:.2f},"
            f" crypto-only {hsm['crypto'] / soft['crypto']:.2f}"
        )


if __name__ == "__main__":
    main()
