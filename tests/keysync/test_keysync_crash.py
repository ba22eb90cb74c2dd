"""``kill -9`` of the server in the middle of an import, and of the worker or the server
(with its in-process worker) in the middle of deliveries: after a restart nothing is lost
and nothing is stored twice. Real processes, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select

from harness import Node, admin_token_for, free_port, node_environment, start_node, stop, wait_ready
from trustfleet.keysync.imports import BATCH_ROWS
from trustfleet.keysync.models import TerminalKey
from trustfleet.keysync.receiver import ReceivedKeys, create_receiver_app
from trustfleet.keysync.terminal import M2mTerminal, post_sms
from trustfleet.kit.outbox.models import OutboxMessage
from trustfleet.kit.outbox.webhooks import Verifier, decode_public_key
from trustfleet.store.engine import make_engine

from .conftest import ServerThread

pytestmark = pytest.mark.slow

ROWS = 100_000
MESSAGES = 30
SECRET = "gateway-secret-for-the-crash-test"


def token(node: Node, admin: str, role: str) -> str:
    answer = httpx.post(
        node.url + "/v1/tokens",
        headers={"Authorization": f"Bearer {admin}"},
        json={"name": role, "role": role},
    )
    assert answer.status_code in (200, 201), answer.text
    return str(answer.json()["token"])


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()  # SIGKILL: no clean-up of any kind
    process.wait()


def scalar(url: str, statement: Any) -> Any:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(statement).scalar()
    finally:
        engine.dispose()


def test_kill_9_of_the_server_mid_import_loses_and_duplicates_nothing(
    tmp_path: Path, database_url: str
) -> None:
    env = node_environment(database_url, tmp_path)
    admin = admin_token_for(database_url)
    csv = tmp_path / "keys.csv"
    with csv.open("w") as out:
        out.write("terminal_id,key_id,key\n")
        for i in range(ROWS):
            out.write(f"T-{i // 2},{secrets.token_hex(8)},{secrets.token_hex(16)}\n")
    node = start_node("a", env, tmp_path / "node-a")
    wait_ready(node)
    maker = token(node, admin, "manufacturer")
    headers = {"Authorization": f"Bearer {maker}", "Content-Type": "text/csv"}

    def upload(target: Node) -> httpx.Response:
        with csv.open("rb") as body:
            return httpx.put(
                f"{target.url}/v1/keysync/imports/big", content=body, headers=headers,
                timeout=600,
            )  # fmt: skip

    sender = threading.Thread(target=lambda: _swallow_errors(upload, node), daemon=True)
    sender.start()
    done_at_kill = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = httpx.get(f"{node.url}/v1/keysync/imports/big", headers=headers, timeout=10)
        if seen.status_code == 200 and seen.json()["rows_done"] >= 10_000:
            done_at_kill = seen.json()["rows_done"]
            kill(node.process)
            break
        time.sleep(0.02)
    assert 0 < done_at_kill < ROWS, "the import was not caught in the middle"
    sender.join(30)
    committed = scalar(database_url, select(func.count()).select_from(TerminalKey))
    assert committed >= done_at_kill and committed % BATCH_ROWS == 0  # whole batches only

    restarted = start_node("b", env, tmp_path / "node-b")
    try:
        wait_ready(restarted)
        answer = upload(restarted)
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert (report["status"], report["rows_done"]) == ("completed", ROWS)
        assert (report["accepted"], report["unchanged"], report["rejected"]) == (ROWS, 0, 0)
        assert scalar(database_url, select(func.count()).select_from(TerminalKey)) == ROWS
        again = upload(restarted).json()  # the same file once more: nothing changes
        assert again == report
    finally:
        stop(restarted)


def _swallow_errors(call: Any, *args: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server was killed under it
        call(*args)


class SlowReceiver:
    """The platform receiver, each request taking a little while."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(0.05)
        await self.app(scope, receive, send)


def start_cli(env: dict[str, str], data_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(mode=0o700, exist_ok=True)  # serve refuses one others can read
    log = (data_dir / f"{args[0]}-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "trustfleet.cli", *args],
        env={**env, "TRUSTFLEET_DATA_DIR": str(data_dir)},
        stdout=log,
        stderr=log,
    )


@pytest.mark.parametrize("victim", ["worker", "serve"])
def test_kill_9_mid_deliveries_every_key_arrives_once(
    tmp_path: Path, database_url: str, victim: str
) -> None:
    env = {
        **node_environment(database_url, tmp_path),
        "TRUSTFLEET_OUTBOX_RETRY_SCHEDULE": ",".join(["0"] * 20),
        "TRUSTFLEET_OUTBOX_REQUEST_TIMEOUT": "1",
    }
    admin = admin_token_for(database_url)
    port = free_port()
    data_dir = tmp_path / "data"
    api_port = free_port()
    if victim == "serve":  # the server delivers, with its in-process worker
        server = start_cli(env, data_dir, "serve", "--port", str(api_port))
        node = Node("serve", f"http://127.0.0.1:{api_port}", server, data_dir / "x.log")
    else:  # the API node runs no worker; `trustfleet worker` delivers
        node = start_node("api", {**env, "TRUSTFLEET_OUTBOX_WORKER": "0"}, tmp_path / "api")
    wait_ready(node)
    platform_key = x25519.X25519PrivateKey.generate()
    keys = ReceivedKeys(tmp_path / "received.db")
    call = httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {admin}"})
    public = platform_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    platform = call.put(
        "/v1/keysync/platforms/app",
        json={"url": f"http://127.0.0.1:{port}/webhook", "hpke_public_key_pem": public.decode()},
    ).json()
    receiver_app = create_receiver_app(
        application_id="app", private_key=platform_key,
        verifier=Verifier(public_key=decode_public_key(platform["verifier"])), keys=keys,
    )  # fmt: skip
    receiver = ServerThread(SlowReceiver(receiver_app), port).start()
    webhook = f"{node.url}/v1/keysync/sms/gw"
    call.put("/v1/keysync/gateways/gw", json={"webhook_url": webhook, "secret": SECRET})
    terminals = [
        M2mTerminal.factory(tmp_path / f"t{i}", f"T-{i}", f"+86144000000{i:04d}", ["app"])
        for i in range(MESSAGES)
    ]
    maker, operator = token(node, admin, "manufacturer"), token(node, admin, "operator")
    rows = "".join(t.csv_rows(header=i == 0) for i, t in enumerate(terminals))
    imported = httpx.put(
        f"{node.url}/v1/keysync/imports/t",
        content=rows,
        headers={"Authorization": f"Bearer {maker}", "Content-Type": "text/csv"},
    )
    assert imported.json()["accepted"] == MESSAGES
    worker = None
    try:
        for terminal in terminals:
            httpx.post(f"{node.url}/v1/keysync/registrations",
                       headers={"Authorization": f"Bearer {operator}"},
                       json={"mdn": terminal.mdn, "application_ids": ["app"]})  # fmt: skip
            form = terminal.sms_form(terminal.next_request(), to="+8610690000")
            sent = post_sms(httpx.Client(), webhook, form, gateway_secret=SECRET)
            assert sent.status_code == 200, sent.text
        if victim == "worker":
            worker = start_cli(env, data_dir, "worker")
        deadline = time.monotonic() + 60
        while len(keys.all()) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        stored_at_kill = len(keys.all())
        kill(worker if worker is not None else node.process)
        assert 0 < stored_at_kill < MESSAGES, "the deliveries were not caught in the middle"
        if victim == "worker":
            worker = start_cli(env, data_dir, "worker")
        else:
            server = start_cli(env, data_dir, "serve", "--port", str(api_port))
            node = Node("serve", node.url, server, node.log)
            wait_ready(node)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            pending = scalar(
                database_url,
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.status != "delivered"),
            )
            if pending == 0:
                break
            time.sleep(0.2)
        stored = keys.all()
        assert pending == 0
        assert len(stored) == MESSAGES  # every key, each once
        assert len({s.webhook_id for s in stored}) == MESSAGES
        held = {k.key_id: k.key for t in terminals for k in t.keys}
        assert all(held[s.key_id] == s.key for s in stored)
    finally:
        if worker is not None:
            kill(worker)
        stop(node)
        receiver.stop()
        keys.close()
        call.close()
