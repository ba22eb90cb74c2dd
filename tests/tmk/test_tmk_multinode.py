"""Two real server processes on one PostgreSQL database serve TMK downloads as one service:
a download that starts on one node continues on the other and completes on the first (in
either protocol version), working keys issued on one node are used on the other, and a
gateway that retries a step on the other node gets the first answer again. Once with the
soft store (a shared master key file), once with the PKCS#11 backend (one SoftHSM2 token
both nodes open)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
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
    pkcs11_environment,
    postgres_schema,
    running_nodes,
)
from trustfleet.tmk.protocol import (
    PROTOCOL_V1,
    PROTOCOL_V2,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalSession,
)
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

from .conftest import KEYSTORES

PAN = "4761739001010010"

pytestmark = [*needs_postgres, pytest.mark.slow]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema("tmk_") as url:
        yield url


@pytest.fixture(params=KEYSTORES)
def env(request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path) -> dict[str, str]:
    if request.param == "soft":
        return node_environment(postgres_url, tmp_path)
    token, conf = request.getfixturevalue("softhsm_conf")
    return {
        **node_environment(postgres_url, tmp_path, master_key=False),
        **pkcs11_environment(token, conf),
    }


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

        # several terminals at once, each hopping, starting on either node, in either
        # protocol version (the version travels in the ticket and the stored session)
        def hop(index: int) -> bytes:
            ordered = clients if index % 2 else clients[::-1]
            version = PROTOCOL_V1 if index % 2 else PROTOCOL_V2
            transport = Alternating(ordered, tokens["device-gateway"])
            return terminals[index].download(transport, version=version).kcv

        with ThreadPoolExecutor(max_workers=5) as pool:
            kcvs = list(pool.map(hop, range(1, 5)))
        assert kcvs == [t.scm.tmk_kcv for t in terminals[1:5]]

        # the emulator's own command line, against node b, as a version 1 terminal
        command = [sys.executable, "-m", "trustfleet.cli", "emulate", "pos", "download"]
        command += ["--dir", str(terminals[5].directory), "--server", b.url]
        command += ["--protocol-version", "1"]
        cli = subprocess.run(
            command,  # the gateway's token from the environment, never on the command line
            capture_output=True,
            text=True,
            env={**env, "TRUSTFLEET_TOKEN": tokens["device-gateway"]},
            timeout=120,
            check=False,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "active" in cli.stdout and "protocol version 1" in cli.stdout

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
        if env.get("TRUSTFLEET_KEYSTORE_BACKEND") == "pkcs11":
            assert not list(tmp_path.rglob("master.key"))  # the token is the root of trust
    finally:
        for client in clients:
            client.close()


def test_copies_of_each_step_on_both_nodes_get_one_answer_and_the_tmk_stays_active(
    nodes: tuple[Node, Node], postgres_url: str, tmp_path: Path
) -> None:
    """A gateway that retries on the other node: the same proof and the same confirmation
    sent to both nodes at once, and again one after the other, get byte-identical answers;
    the download completes and the terminal's TMK is the active one."""
    a, b = nodes
    admin = {"Authorization": f"Bearer {admin_token_for(postgres_url)}"}
    clients = [httpx.Client(base_url=n.url, timeout=30) for n in (a, b)]
    try:
        tokens = {
            role: clients[0]
            .post("/v1/tokens", json={"name": role, "role": role}, headers=admin)
            .json()["token"]
            for role in ("manufacturer", "device-gateway", "operator")
        }
        root = clients[1].post("/v1/tmk/identity", headers=admin).json()["ksrcrt_pem"]
        gateway = {
            "Authorization": f"Bearer {tokens['device-gateway']}",
            "Content-Type": "application/json",
        }
        for index in range(4):
            sn = f"RETRY-POS-{index}"
            directory = tmp_path / sn
            PosTerminal.factory(directory, sn, root_pem=root.encode())
            terminal = PosTerminal.open(directory)
            registered = clients[index % 2].post(
                "/v1/tmk/terminals/import",
                content=(directory / "record.ndjson").read_bytes(),
                headers={
                    "Authorization": f"Bearer {tokens['manufacturer']}",
                    "Content-Type": "application/x-ndjson",
                },
            )
            assert registered.json()["accepted"] == 1, registered.text
            version = PROTOCOL_V1 if index % 2 else PROTOCOL_V2
            session = TerminalSession(terminal.scm, ServerTrust(terminal.roots), version=version)
            started = clients[index % 2].post(
                "/v1/tmk/downloads", content=session.start().to_json(), headers=gateway
            )
            challenge = ServerChallenge.from_json(started.content)
            base = f"/v1/tmk/downloads/{challenge.session_id}"

            def both(path: str, body: bytes) -> list[httpx.Response]:
                barrier = threading.Barrier(2)

                def send(client: httpx.Client) -> httpx.Response:
                    barrier.wait()
                    return client.post(path, content=body, headers=gateway)

                with ThreadPoolExecutor(max_workers=2) as pool:
                    answers = list(pool.map(send, clients))
                return [*answers, *(c.post(path, content=body, headers=gateway) for c in clients)]

            proof = session.receive_challenge(challenge).to_json()
            deliveries = both(f"{base}/proof", proof)
            assert [d.status_code for d in deliveries] == [200] * 4, [d.text for d in deliveries]
            assert len({d.content for d in deliveries}) == 1  # v2: one signature, stored
            delivered = json.loads(deliveries[0].content)
            assert delivered["v"] == version and ("signature" in delivered) == (version == 2)
            confirmation = session.receive_delivery(KeyDelivery.from_json(deliveries[0].content))
            activations = both(f"{base}/confirm", confirmation.to_json())
            assert [r.status_code for r in activations] == [200] * 4, [r.text for r in activations]
            assert len({r.content for r in activations}) == 1
            status = clients[(index + 1) % 2].get(
                f"/v1/tmk/terminals/{sn}",
                headers={"Authorization": f"Bearer {tokens['operator']}"},
            )
            assert status.json()["active_tmk"]["kcv"] == terminal.scm.tmk_kcv.hex().upper()
            assert status.json()["active_tmk"]["session_id"] == challenge.session_id
        page = clients[1].get("/v1/audit", params={"limit": 1000}, headers=admin).json()
        actions = [r["action"] for r in page["items"]]
        assert actions.count("tmk.tmk_activated") == 4
        assert "tmk.download_failed" not in actions
    finally:
        for client in clients:
            client.close()
