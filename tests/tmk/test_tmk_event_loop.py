"""On SQLite the download steps run on the server's event loop (no thread-pool hop). Nothing
else may then hold the database's write lock while it waits for that loop: a bulk import
whose body is still arriving must not stall downloads, and downloads keep being served."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness import admin_token_for, node_environment, running_nodes
from trustfleet.store.engine import sqlite_url
from trustfleet.tmk.registry import CHUNK_ROWS
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

pytestmark = pytest.mark.slow

BULK_ROWS = 2 * CHUNK_ROWS
DOWNLOAD_SECONDS = 8.0  # far below the 10 s busy timeout a stalled loop would run into


def _tokens(client: httpx.Client, admin: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {admin}"}
    made = {}
    for role in ("manufacturer", "device-gateway"):
        answer = client.post("/v1/tokens", json={"name": role, "role": role}, headers=headers)
        made[role] = answer.json()["token"]
    return made


def _terminals(tmp_path: Path, root_pem: str, prefix: str, count: int) -> list[PosTerminal]:
    made = []
    for i in range(count):
        directory = tmp_path / f"{prefix}-{i}"
        PosTerminal.factory(directory, f"{prefix}-{i}", root_pem=root_pem.encode())
        made.append(PosTerminal.open(directory))
    return made


def test_downloads_complete_while_an_import_body_is_still_arriving(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path / "shared.db")
    admin = admin_token_for(database)
    with (
        running_nodes(node_environment(database, tmp_path), tmp_path, count=1) as (node,),
        httpx.Client(base_url=node.url, timeout=30) as client,
    ):
        tokens = _tokens(client, admin)
        root = client.post("/v1/tmk/identity", headers={"Authorization": f"Bearer {admin}"}).json()[
            "ksrcrt_pem"
        ]
        early = _terminals(tmp_path, root, "EARLY", 3)
        late = _terminals(tmp_path, root, "LATE", 4)
        manufacturer = {"Authorization": f"Bearer {tokens['manufacturer']}"}
        ndjson = {**manufacturer, "Content-Type": "application/x-ndjson"}
        first = b"".join((t.directory / "record.ndjson").read_bytes() for t in early)
        assert client.post("/v1/tmk/terminals/import", content=first, headers=ndjson).json()[
            "accepted"
        ] == len(early)

        release = threading.Event()

        records = [(t.directory / "record.ndjson").read_bytes() for t in late]
        # more rows than the import writes per statement, so it has begun writing
        public_key = json.loads(records[0])["public_key"]
        bulk = b"".join(
            json.dumps({"sn": f"BULK-{i:05d}", "public_key": public_key}).encode() + b"\n"
            for i in range(BULK_ROWS)
        )

        def slow_body() -> Iterator[bytes]:
            yield bulk + b"".join(records[:2])
            release.wait(timeout=30)  # the rest arrives only after the downloads are done
            yield b"".join(records[2:])

        with ThreadPoolExecutor(max_workers=1) as pool:
            importing = pool.submit(
                client.post, "/v1/tmk/terminals/import", content=slow_body(), headers=ndjson
            )
            time.sleep(0.5)  # the import request is in, half its body with it
            transport = HttpTransport(client, tokens["device-gateway"])
            try:
                for terminal in early:
                    started = time.monotonic()
                    result = terminal.download(transport)
                    assert time.monotonic() - started < DOWNLOAD_SECONDS
                    assert result.kcv == terminal.scm.tmk_kcv
                assert not importing.done()
            finally:
                release.set()
            report = importing.result(timeout=30)
        assert report.status_code == 200, report.text
        assert report.json()["accepted"] == BULK_ROWS + len(late)
        # and the late terminals download too, now that they are registered
        assert late[0].download(transport).kcv == late[0].scm.tmk_kcv
