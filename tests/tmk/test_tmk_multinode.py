"""Two real server processes on one PostgreSQL database serve TMK downloads as one service:
a download that starts on one node continues on the other and completes on the first, and
working keys issued on one node are used on the other."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness import (
    Node,
    admin_token_for,
    needs_postgres,
    node_environment,
    postgres_schema,
    running_nodes,
)
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

PAN = "4761739001010010"

pytestmark = [*needs_postgres, pytest.mark.slow]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema("tmk_") as url:
        yield url


@pytest.fixture
def env(postgres_url: str, tmp_path: Path) -> dict[str, str]:
    return node_environment(postgres_url, tmp_path)


@pytest.fixture
def nodes(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    with running_nodes(env, tmp_path) as (a, b):
        yield a, b


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
    admin = {"Authorization": f"Bearer {admin_token_for(postgres_url)}"}
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
            command,  # the gateway's token from the environment, never on the command line
            capture_output=True,
            text=True,
            env={**env, "TRUSTFLEET_TOKEN": tokens["device-gateway"]},
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
        activated = [r for r in page["items"] if r["action"] == "tmk.tmk_activated"]
        assert len(activated) == 6
        assert json.dumps(page).count("tmk.download_failed") == 0
    finally:
        for client in clients:
            client.close()
