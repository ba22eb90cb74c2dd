"""Starting a node from settings: build_context, the uvicorn factory and serve()."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from trustfleet.errors import MasterKeyError
from trustfleet.keystore.master import create_master_key_file
from trustfleet.server.protocol import HttpProtocol, protocol_for
from trustfleet.server.runner import HTTP_PROTOCOL, app_from_env, build_context, protocol_warning
from trustfleet.settings import Settings, load_settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    create_master_key_file(tmp_path / "master.key")
    return tmp_path


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_build_context_migrates_and_opens_the_key_store(data_dir: Path) -> None:
    context = build_context(Settings(data_dir=data_dir))
    try:
        assert {"api_tokens", "audit_log"} <= set(inspect(context.engine).get_table_names())
        assert context.keystore.list() == []
        build_context(Settings(data_dir=data_dir)).engine.dispose()  # idempotent
    finally:
        context.engine.dispose()


def test_build_context_fails_at_start_without_a_master_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRUSTFLEET_MASTER_KEY", raising=False)
    with pytest.raises(MasterKeyError):
        build_context(Settings(data_dir=tmp_path))


def test_app_factory_reads_the_environment(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setenv("TRUSTFLEET_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TRUSTFLEET_MAX_BODY_BYTES", "10")
    monkeypatch.delenv("TRUSTFLEET_MASTER_KEY", raising=False)
    app = app_from_env()
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/tokens", content=b"x" * 11).status_code == 413
    app.state.context.engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_answers_and_logs_json_lines(data_dir: Path) -> None:
    port = _free_port()
    settings = load_settings(data_dir, port=port, log_level="INFO")
    code = (
        "from pathlib import Path; from trustfleet.settings import load_settings;"
        "from trustfleet.server.runner import serve;"
        f"serve(load_settings(Path({str(settings.data_dir)!r}), port={port}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTFLEET_")}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200
        assert "server" not in response.headers
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert any(
        line["logger"] == "trustfleet.access" and line["path"] == "/healthz" for line in lines
    )
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's too, as JSON


@pytest.mark.parametrize(
    ("argv", "warned"),
    [
        (["/venv/bin/uvicorn", "--factory", "trustfleet.server.runner:app_from_env"], True),
        (["/venv/lib/uvicorn/__main__.py", "--factory", "x:app", "--http", "h11"], True),
        (["/venv/bin/uvicorn", "--factory", "x:app", "--http", HTTP_PROTOCOL], False),
        (["/venv/bin/uvicorn", "--factory", "x:app", f"--http={HTTP_PROTOCOL}"], False),
        (["/venv/bin/gunicorn", "-k", "uvicorn.workers.UvicornWorker"], False),
        ([], False),
    ],
)
def test_uvicorn_without_trustfleets_protocol_is_warned_about(
    argv: list[str], warned: bool
) -> None:
    warning = protocol_warning(argv)
    assert (warning is not None) is warned
    if warning is not None:
        assert HTTP_PROTOCOL in warning and "not limited" in warning


def test_the_protocol_carries_the_limits_of_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, max_header_bytes=8192, header_read_timeout=3, keep_alive_timeout=7
    )
    protocol = protocol_for(settings)
    assert issubclass(protocol, HttpProtocol)
    assert protocol.limits is not None
    assert (protocol.limits.max_header_bytes, protocol.limits.header_read_timeout) == (8192, 3)
    assert protocol.limits.keep_alive_timeout == 7
    assert HttpProtocol.limits is None  # the class uvicorn's command line names reads them itself
