"""Hostile requests cost little: header bombs, slow and idle connections and bad-token
floods against a real server process. The server keeps answering ``/healthz`` throughout,
every refusal is problem+json, and the audit log grows by a bounded amount."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from harness import (
    Node,
    admin_token_for,
    init_data_dir,
    node_environment,
    served,
    start_node,
    stop,
    wait_ready,
)

HEADER_READ_TIMEOUT = 2
KEEP_ALIVE_TIMEOUT = 1
REFUSAL_WINDOW = 3
MAX_HEADER_BYTES = 16_384


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    database_url = f"sqlite:///{tmp_path / 'trustfleet.db'}"
    admin_token_for(database_url)
    env = {
        **node_environment(database_url, tmp_path),
        "TRUSTFLEET_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "TRUSTFLEET_HEADER_READ_TIMEOUT": str(HEADER_READ_TIMEOUT),
        "TRUSTFLEET_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "TRUSTFLEET_REFUSAL_AUDIT_WINDOW": str(REFUSAL_WINDOW),
    }
    started = start_node("a", env, tmp_path / "node")
    try:
        wait_ready(started)
        yield started, database_url
    finally:
        stop(started)


def _address(node: Node) -> tuple[str, int]:
    host, port = node.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(node: Node, timeout: float = 10) -> socket.socket:
    return socket.create_connection(_address(node), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65_536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (with a Content-Length) on a connection kept open."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65_536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65_536)
    return head + b"\r\n\r\n" + body


def _problem(raw: bytes, status: int, code: str) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"] == f"urn:trustfleet:problem:{code}"
    return dict(problem)


def _healthy(node: Node) -> None:
    started = time.monotonic()
    assert httpx.get(node.url + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 2


def _audit_rows(database_url: str) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT action, details FROM audit_log ORDER BY seq")
            ).all()
    finally:
        engine.dispose()
    return [{"action": action, "details": json.loads(details)} for action, details in rows]


def test_a_1_mib_header_gets_431_problem_json(node: tuple[Node, str]) -> None:
    server, _ = node
    with _connect(server) as sock:
        started = time.monotonic()
        header = b"X-Big: " + b"a" * 1_048_576 + b"\r\n"
        # all of it is taken (and dropped): the client reads the answer, not a reset
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
        raw = _read_all(sock)
        assert time.monotonic() - started < 5
    problem = _problem(raw, 431, "headers-too-large")
    assert str(MAX_HEADER_BYTES) in problem["detail"]
    _healthy(server)


def test_headers_over_the_limit_in_one_read_get_431(node: tuple[Node, str]) -> None:
    """A whole request in one read is measured too, not only one still arriving."""
    server, _ = node
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))  # ~20 KiB
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        _problem(_read_all(sock), 431, "headers-too-large")
    # under the limit is fine
    small = {f"x-h{i}": "v" * 1000 for i in range(10)}
    assert httpx.get(server.url + "/healthz", headers=small, timeout=5).status_code == 200


@pytest.mark.slow
def test_a_huge_streamed_header_is_cut_off_early(node: tuple[Node, str]) -> None:
    """128 MiB of one header: the server stops reading after a few MiB, at once."""
    server, _ = node
    chunk = b"a" * 1_048_576
    sent = 0
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 128 * len(chunk):
                sock.sendall(chunk)
                sent += len(chunk)
        elapsed = time.monotonic() - started
    print(f"a 128 MiB header was cut off after {sent / len(chunk):.0f} MiB, {elapsed:.2f} s")
    assert sent < 32 * len(chunk), f"the server took {sent} bytes"
    assert elapsed < 5, f"{elapsed:.1f} s"
    _healthy(server)


def test_a_malformed_request_line_gets_400_problem_json(node: tuple[Node, str]) -> None:
    server, _ = node
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        with _connect(server) as sock:
            sock.sendall(garbage)
            _problem(_read_all(sock), 400, "bad-request")
    _healthy(server)


@pytest.mark.slow
def test_slow_connections_are_closed_after_the_header_read_timeout(
    node: tuple[Node, str],
) -> None:
    """150 connections trickle a request's headers (and 50 send nothing): each gets 408 and
    is closed when the header-read timeout has passed, while /healthz keeps answering."""
    server, _ = node
    slow = [_connect(server, timeout=HEADER_READ_TIMEOUT + 10) for _ in range(150)]
    silent = [_connect(server, timeout=HEADER_READ_TIMEOUT + 10) for _ in range(50)]
    started = time.monotonic()
    try:
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # a byte now and then does not reset the timer
        for _ in range(3):
            time.sleep(HEADER_READ_TIMEOUT / 4)
            _healthy(server)
            for sock in slow:
                sock.sendall(b"X")

        def outcome(sock: socket.socket) -> tuple[bytes, float]:
            raw = _read_all(sock)
            return raw, time.monotonic() - started

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(outcome, slow + silent))
    finally:
        for sock in slow + silent:
            sock.close()
    for raw, elapsed in results:
        assert HEADER_READ_TIMEOUT - 0.5 <= elapsed < HEADER_READ_TIMEOUT + 5, elapsed
        problem = _problem(raw, 408, "request-timeout")
        assert problem["detail"].endswith(f"within {HEADER_READ_TIMEOUT} seconds")
    _healthy(server)


@pytest.mark.slow
def test_a_slow_request_on_a_kept_alive_connection_times_out_too(node: tuple[Node, str]) -> None:
    server, _ = node
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request, begun and left
        started = time.monotonic()
        for _ in range(4):
            time.sleep(HEADER_READ_TIMEOUT / 5)
            sock.sendall(b"X")
        raw = _read_all(sock)
        elapsed = time.monotonic() - started
    _problem(raw, 408, "request-timeout")
    assert HEADER_READ_TIMEOUT - 0.5 <= elapsed < HEADER_READ_TIMEOUT + 3, elapsed


def test_pipelined_requests_are_answered_in_order(node: tuple[Node, str]) -> None:
    server, _ = node
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(request * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = _read_all(sock)
    assert raw.count(b"HTTP/1.1 200 ") == 4


@pytest.mark.slow
def test_idle_keep_alive_connections_are_closed(node: tuple[Node, str]) -> None:
    server, _ = node
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed, nothing more said
        elapsed = time.monotonic() - started
    assert KEEP_ALIVE_TIMEOUT - 0.5 <= elapsed < KEEP_ALIVE_TIMEOUT + 3, elapsed


@pytest.mark.slow
def test_a_bad_token_flood_adds_a_bounded_number_of_audit_rows(
    node: tuple[Node, str],
) -> None:
    """2,000 requests with bad tokens from one client: one record for the first, one
    aggregate record counting the rest when the window has closed."""
    server, database_url = node
    before = len(_audit_rows(database_url))
    flood = 2_000
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.monotonic()
        for i in range(flood):
            answer = client.get("/v1/tokens", headers={"Authorization": f"Bearer tf_bad{i}"})
            assert answer.status_code == 401
            assert answer.headers["content-type"] == "application/problem+json"
        elapsed = time.monotonic() - started
        _healthy(server)
    # the aggregate is written once the window has closed (a timer), without more requests
    deadline = time.monotonic() + 2 * REFUSAL_WINDOW + 5
    while time.monotonic() < deadline:
        added = _audit_rows(database_url)[before:]
        if sum(r["details"].get("count", 1) for r in added) >= flood:
            break
        time.sleep(0.5)
    failed = [r for r in added if r["action"] == "auth.failed"]
    print(f"{flood} bad tokens in {elapsed:.1f} s added {len(added)} audit rows")
    # at most one record per window that saw the flood, and one aggregate per window
    windows = int(elapsed // REFUSAL_WINDOW) + 2
    assert len(added) == len(failed) <= 2 * windows, (len(added), elapsed)
    single = [r for r in failed if not r["details"].get("aggregate")]
    aggregates = [r for r in failed if r["details"].get("aggregate")]
    assert single and aggregates
    assert single[0]["details"]["client"] == "127.0.0.1"
    assert len(single) + sum(r["details"]["count"] for r in aggregates) == flood
    for record in aggregates:
        assert record["details"]["client"] == "127.0.0.1"
        assert record["details"]["kinds"] == {"unknown": record["details"]["count"]}
        assert record["details"]["subjects"] == {"GET /v1/tokens": record["details"]["count"]}


def test_the_server_still_serves_after_it_all(node: tuple[Node, str]) -> None:
    server, _ = node
    _healthy(server)
    assert server.process.poll() is None


@pytest.mark.slow
def test_trustfleet_serve_enforces_the_limits_of_its_settings(tmp_path: Path) -> None:
    """``trustfleet serve`` (not uvicorn's command line) serves with the same protocol, its
    limits from the data directory's trustfleet.toml."""
    data = tmp_path / "data"
    init_data_dir(data)
    (data / "trustfleet.toml").write_text("max_header_bytes = 8192\nheader_read_timeout = 1\n")
    with served(data) as running:
        server = Node("serve", running.url, running.process, running.log)
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            problem = _problem(_read_all(sock), 431, "headers-too-large")
        assert "8192 bytes" in problem["detail"]
        with _connect(server) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            _problem(_read_all(sock), 408, "request-timeout")
            assert time.monotonic() - started < 3
        with _connect(server) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            _problem(_read_all(sock), 400, "bad-request")
        _healthy(server)


@pytest.mark.slow
def test_over_tls_a_big_header_gets_431_too(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with served(data, "--tls-local-ca") as running:
        context = ssl.create_default_context(cafile=str(data / "ca" / "root.pem"))
        host, port = running.url.removeprefix("https://").split(":")
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_048_576)
            sock.sendall(b"\r\n\r\n")
            answer = b""
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                while chunk := sock.recv(65_536):
                    answer += chunk
        _problem(answer, 431, "headers-too-large")
        verify = ssl.create_default_context(cafile=str(data / "ca" / "root.pem"))
        assert httpx.get(running.url + "/healthz", verify=verify, timeout=5).status_code == 200
