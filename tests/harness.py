"""Test harness shared across test folders: PostgreSQL schemas, real server nodes in
subprocesses, and the ``trustfleet`` command line run as a user runs it."""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from trustfleet.keystore.master import create_master_key_file
from trustfleet.server.auth import bootstrap_admin_token
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate

POSTGRES_URL = os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL", "")
STARTUP_SECONDS = 60

#: marks of a test that needs PostgreSQL (it is skipped only when no server is configured)
needs_postgres = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="TRUSTFLEET_TEST_POSTGRES_URL is not set"),
]


@contextmanager
def postgres_schema(prefix: str = "t_") -> Iterator[str]:
    """A URL to a fresh schema of the test PostgreSQL database, dropped afterwards."""
    schema = prefix + secrets.token_hex(6)
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


def admin_token_for(database_url: str) -> str:
    """A fresh admin token in the database at ``database_url`` (migrated first)."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        return bootstrap_admin_token(Database(engine))
    finally:
        engine.dispose()


# -- server nodes ------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment of server nodes sharing one database and one master key file."""
    master_key = tmp_path / "master.key"
    create_master_key_file(master_key)
    environment = {
        **os.environ,
        "TRUSTFLEET_DATABASE_URL": database_url,
        "TRUSTFLEET_MASTER_KEY_FILE": str(master_key),
        "TRUSTFLEET_LOG_LEVEL": "WARNING",
    }
    environment.pop("TRUSTFLEET_MASTER_KEY", None)
    environment.pop("TRUSTFLEET_CONFIG", None)
    return environment


def start_node(name: str, env: dict[str, str], data_dir: Path) -> Node:
    """``uvicorn --factory trustfleet.server.runner:app_from_env`` on a free loopback port."""
    port = free_port()
    data_dir.mkdir()
    log = data_dir / "server.log"
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "trustfleet.server.runner:app_from_env",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**env, "TRUSTFLEET_DATA_DIR": str(data_dir)}, stdout=out, stderr=out
        )
    return Node(name, f"http://127.0.0.1:{port}", process, log)


def wait_ready(node: Node, verify: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            pytest.fail(f"node {node.name} exited:\n{node.log.read_text()[-3000:]}")
        try:
            if httpx.get(node.url + "/readyz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"node {node.name} not ready:\n{node.log.read_text()[-3000:]}")


def stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@contextmanager
def running_nodes(env: dict[str, str], tmp_path: Path, count: int = 2) -> Iterator[list[Node]]:
    """``count`` ready server nodes on ``env``'s database, stopped afterwards."""
    started = [start_node(chr(ord("a") + i), env, tmp_path / f"node-{i}") for i in range(count)]
    try:
        for node in started:
            wait_ready(node)
        yield started
    finally:
        for node in started:
            stop(node)


# -- the command line --------------------------------------------------------------------


def cli_environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``trustfleet`` subprocess: ``data_dir`` as its data directory,
    none of the caller's server, token or login settings, a wide terminal."""
    env = {**os.environ, "TRUSTFLEET_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    for name in ("TRUSTFLEET_MASTER_KEY", "TRUSTFLEET_ADDR", "TRUSTFLEET_TOKEN",
                 "TRUSTFLEET_CACERT", "TRUSTFLEET_OUTPUT"):  # fmt: skip
        env.pop(name, None)
    env.setdefault("XDG_CONFIG_HOME", str(data_dir.parent / "config"))
    env.update(extra)
    return env


def run_cli(
    data_dir: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``trustfleet ARGS`` in a subprocess with ``data_dir`` as its data directory; ``env``
    adds variables, ``stdin`` is its standard input."""
    result = subprocess.run(
        [sys.executable, "-m", "trustfleet.cli", *args],
        capture_output=True,
        text=True,
        env=cli_environment(data_dir, **(env or {})),
        input=stdin if stdin is not None else "",
        timeout=180,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


def tokens_in(output: str) -> list[str]:
    return [word for word in output.split() if word.startswith("tf_")]


@dataclass
class Served:
    """A ``trustfleet serve`` process: its URL, data directory and admin token."""

    url: str
    data_dir: Path
    admin_token: str
    process: subprocess.Popen[bytes]
    log: Path


def init_data_dir(data_dir: Path) -> str:
    """``trustfleet init`` in ``data_dir``; the admin token it printed."""
    (token,) = tokens_in(run_cli(data_dir, "init").stdout)
    return token


@contextmanager
def served(
    data_dir: Path, *serve_args: str, admin_token: str = "", ca_file: Path | None = None
) -> Iterator[Served]:
    """``trustfleet serve`` on a free loopback port over ``data_dir`` (initialised if it is
    not), ready, stopped afterwards. With a ``--tls-...`` option the URL is https:// and
    readiness is checked against ``ca_file`` (default: the data directory's root CA)."""
    if not (data_dir / ".initialised").is_file():
        admin_token = init_data_dir(data_dir)
    port = free_port()
    tls = any(arg.startswith("--tls-") for arg in serve_args)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    log = data_dir.parent / f"serve-{port}.log"
    env = cli_environment(data_dir, TRUSTFLEET_LOG_LEVEL="WARNING")
    command = [sys.executable, "-m", "trustfleet.cli", "serve", "--port", str(port), *serve_args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    node = Node("serve", url, process, log)
    try:
        root = ca_file or data_dir / "ca" / "root.pem"
        verify = ssl.create_default_context(cafile=str(root)) if tls else True
        wait_ready(node, verify=verify)
        yield Served(url, data_dir, admin_token, process, log)
    finally:
        stop(node)
