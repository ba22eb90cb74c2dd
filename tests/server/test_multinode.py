"""Two real server processes on one PostgreSQL database behave as one service: a token
made on one node works on the other, a revocation on one is honoured by the other at once,
and both append to one valid audit chain (also when they write at the same time)."""

from __future__ import annotations

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

POSTGRES_URL = os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL", "")
STARTUP_SECONDS = 60

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
    schema = "mn_" + secrets.token_hex(6)
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
def nodes(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    master_key = tmp_path / "master.key"
    create_master_key_file(master_key)
    env = {
        **os.environ,
        "TRUSTFLEET_DATABASE_URL": postgres_url,
        "TRUSTFLEET_MASTER_KEY_FILE": str(master_key),
        "TRUSTFLEET_LOG_LEVEL": "WARNING",
    }
    env.pop("TRUSTFLEET_MASTER_KEY", None)
    env.pop("TRUSTFLEET_CONFIG", None)
    # both start together: the migration lock makes them take turns creating the schema
    started = [_start_node(name, env, tmp_path / name) for name in ("a", "b")]
    try:
        for node in started:
            _wait_ready(node)
        yield started[0], started[1]
    finally:
        for node in started:
            _stop(node)


def _bootstrap_admin(postgres_url: str) -> str:
    engine = make_engine(postgres_url)
    try:
        migrate(engine)  # already done by the nodes: a no-op
        return bootstrap_admin_token(make_session_factory(engine))
    finally:
        engine.dispose()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_two_nodes_share_tokens_revocations_and_the_audit_chain(
    nodes: tuple[Node, Node], postgres_url: str
) -> None:
    a, b = nodes
    admin = _auth(_bootstrap_admin(postgres_url))

    created = httpx.post(
        a.url + "/v1/tokens", headers=admin, json={"name": "made-on-a", "role": "admin"}
    )
    assert created.status_code == 201, created.text
    token, token_id = created.json()["token"], created.json()["id"]

    used_on_b = httpx.get(b.url + "/v1/tokens", headers=_auth(token))
    assert used_on_b.status_code == 200
    assert "made-on-a" in {t["name"] for t in used_on_b.json()}

    revoked_on_b = httpx.delete(f"{b.url}/v1/tokens/{token_id}", headers=admin)
    assert revoked_on_b.status_code == 200 and revoked_on_b.json()["revoked_at"]

    refused_on_a = httpx.get(a.url + "/v1/tokens", headers=_auth(token))
    assert refused_on_a.status_code == 401
    assert refused_on_a.headers["content-type"].startswith("application/problem+json")

    # both nodes append at the same time: the chain must stay one valid sequence
    def hammer(i: int) -> int:
        node = (a, b)[i % 2]
        return httpx.get(node.url + "/v1/tokens", headers=admin, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(hammer, range(24))) == {200}

    for node in (a, b):
        report = httpx.get(node.url + "/v1/audit/verify", headers=admin).json()
        assert report == {"ok": True, "records": report["records"], "problems": []}
        assert report["records"] >= 1 + 1 + 1 + 1 + 1 + 24

    page = httpx.get(a.url + "/v1/audit", params={"limit": 1000}, headers=admin).json()
    actions = [(r["action"], r["actor"]) for r in page["records"]]
    assert actions[:5] == [
        ("token.created", "init"),
        ("token.created", "token:1:bootstrap admin"),  # on node a
        ("token.listed", f"token:{token_id}:made-on-a"),  # on node b, with a's token
        ("token.revoked", "token:1:bootstrap admin"),  # on node b
        ("auth.failed", "unauthenticated"),  # on node a, the revoked token
    ]
    assert [r["seq"] for r in page["records"]] == list(range(1, len(page["records"]) + 1))
