"""Two real server processes on one PostgreSQL database serve TMK downloads as one service:
a download that starts on one node continues on the other and completes on the first, and
working keys issued on one node are used on the other."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from trustfleet.db import make_engine, make_session_factory, migrate
from trustfleet.keystore.master import create_master_key_file
from trustfleet.server.auth import bootstrap_admin_token
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

POSTGRES_URL = os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL", "")
STARTUP_SECONDS = 60
PAN = "4761739001010010"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_URL, reason="TRUSTFLEET_TEST_POSTGRES_URL is not set"),
]


@dataclass
class Node:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_node(name: str, env: dict[str, str], data_dir: Path) -> Node:
    port = _free_port()
    data_dir.mkdir()
    log = data_dir / "server.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "trustfleet.server.runner:app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**env, "TRUSTFLEET_DATA_DIR": str(data_dir)}, stdout=out, stderr=out
        )
    return Node(name, f"http://127.0.0.1:{port}", process, log)


def _wait_ready(node: Node) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            pytest.fail(f"node {node.name} exited:\n{node.log.read_text()[-3000:]}")
        try:
            if httpx.get(node.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"node {node.name} not ready:\n{node.log.read_text()[-3000:]}")


def _stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    schema = "tmk_" + secrets.token_hex(6)
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def env(postgres_url: str, tmp_path: Path) -> dict[str, str]:
    master_key = tmp_path / "master.key"
    create_master_key_file(master_key)
    environment = {
        **os.environ,
        "TRUSTFLEET_DATABASE_URL": postgres_url,
        "TRUSTFLEET_MASTER_KEY_FILE": str(master_key),
        "TRUSTFLEET_LOG_LEVEL": "WARNING",
    }
    environment.pop("TRUSTFLEET_MASTER_KEY", None)
    environment.pop("TRUSTFLEET_CONFIG", None)
    return environment


@pytest.fixture
def nodes(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    started = [_start_node(name, env, tmp_path / name) for name in ("a", "b")]
    try:
        for node in started:
            _wait_ready(node)
        yield started[0], started[1]
    finally:
        for node in started:
            _stop(node)


def _admin_token(postgres_url: str) -> str:
    engine = make_engine(postgres_url)
    try:
        migrate(engine)
        return bootstrap_admin_token(make_session_factory(engine))
    finally:
        engine.dispose()


class Alternating:
    """A terminal's transport whose every POST goes to the next node in turn."""

    def __init__(self, clients: list[httpx.Client], token: str) -> None:
        self._transports = [HttpTransport(client, token) for client in clients]
        self.served_by: list[int] = []

    def post(self, path: str, body: bytes) -> bytes:
        index = len(self.served_by) % len(self._transports)
        self.served_by.append(index)
        return self._transports[index].post(path, body)

    def get(self, path: str) -> bytes:
        return self._transports[-1].get(path)


def test_downloads_hop_between_nodes_and_keys_work_everywhere(
    nodes: tuple[Node, Node], postgres_url: str, tmp_path: Path, env: dict[str, str]
) -> None:
    a, b = nodes
    admin = {"Authorization": f"Bearer {_admin_token(postgres_url)}"}
    clients = [httpx.Client(base_url=n.url, timeout=30) for n in (a, b)]
    try:
        tokens = {
            role: clients[i % 2]
            .post("/v1/tokens", json={"name": role, "role": role}, headers=admin)
            .json()["token"]
            for i, role in enumerate(("manufacturer", "device-gateway", "operator"))
        }
        root = clients[1].post("/v1/tmk/identity", headers=admin).json()["ksrcrt_pem"]
        terminals = []
        for i in range(6):
            directory = tmp_path / f"pos-{i}"
            PosTerminal.factory(directory, f"MN-POS-{i}", root_pem=root.encode())
            terminals.append(PosTerminal.open(directory))
        records = b"".join((t.directory / "record.ndjson").read_bytes() for t in terminals)
        imported = clients[0].post(
            "/v1/tmk/terminals/import",
            content=records,
            headers={
                "Authorization": f"Bearer {tokens['manufacturer']}",
                "Content-Type": "application/x-ndjson",
            },
        )
        assert imported.json()["accepted"] == 6, imported.text

        # request on a, proof on b, confirmation on a
        first = terminals[0]
        hopping = Alternating(clients, tokens["device-gateway"])
        result = first.download(hopping, crls=[first.fetch_crl(hopping)])
        assert hopping.served_by == [0, 1, 0]
        assert result.kcv == first.scm.tmk_kcv

        # several terminals at once, each hopping, starting on either node
        def hop(index: int) -> bytes:
            ordered = clients if index % 2 else clients[::-1]
            return terminals[index].download(Alternating(ordered, tokens["device-gateway"])).kcv

        with ThreadPoolExecutor(max_workers=5) as pool:
            kcvs = list(pool.map(hop, range(1, 5)))
        assert kcvs == [t.scm.tmk_kcv for t in terminals[1:5]]

        # the emulator's own command line, against node b
        command = [sys.executable, "-m", "trustfleet.cli", "emulate", "pos", "download"]
        command += ["--dir", str(terminals[5].directory), "--server", b.url]
        cli = subprocess.run(
            [*command, "--token", tokens["device-gateway"]],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "active" in cli.stdout

        # a working key issued on b, a PIN block checked on a
        operator = {"Authorization": f"Bearer {tokens['operator']}"}
        issued = clients[1].post(
            f"/v1/tmk/terminals/{first.sn}/working-keys", json={"usage": "P0"}, headers=operator
        )
        assert issued.status_code == 201, issued.text
        first.install_working_key(issued.json()["key_block"], "P0")
        pin_block = first.encrypt_pin("2468", PAN)
        verdict = clients[0].post(
            f"/v1/tmk/terminals/{first.sn}/pin-blocks/verify",
            json={"pin_block": pin_block.hex(), "pan": PAN, "pin": "2468"},
            headers=operator,
        )
        assert verdict.json() == {"match": True}

        report = clients[0].get("/v1/audit/verify", headers=admin).json()
        assert report["ok"] is True
        page = clients[1].get("/v1/audit", params={"limit": 1000}, headers=admin).json()
        activated = [r for r in page["records"] if r["action"] == "tmk.tmk_activated"]
        assert len(activated) == 6
        assert json.dumps(page).count("tmk.download_failed") == 0
    finally:
        for client in clients:
            client.close()
