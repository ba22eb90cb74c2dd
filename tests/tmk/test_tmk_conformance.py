"""``trustfleet tmk conformance`` against a real server process: every check passes against
the key server, directly and through a gateway; a gateway that breaks the protocol, or
tokens that cannot act, fail the run with exit status 1; tokens come from a file or the
environment."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import Node, admin_token_for, node_environment, run_cli, running_nodes
from trustfleet.errors import InvalidInput
from trustfleet.tmk.conformance import TOKEN_VARIABLES, load_tokens

ALL_CHECKS = [
    "key-server-identity",
    "download",
    "download",
    "download",
    "download",
    "download-v1",
    "tmk-algorithms",
    "retried-proof",
    "retried-confirmation",
    "another-proof",
    "wrong-root",
    "tampered-challenge",
    "downgrade",
    "forged-delivery",
    "tampered-ticket",
    "cloned-terminal",
    "bad-confirmation",
    "expired-at-terminal",
    "expired-at-server",
    "wrong-suite",
    "download-not-allowed",
    "revoked-work-certificate",
    "unknown-terminal",
    "malformed-message",
    "revoked-terminal",
]


# =====================================================================================
# A server, its tokens, and a gateway in front of it
# =====================================================================================


@contextmanager
def _server(tmp: Path, **settings: str) -> Iterator[tuple[Node, dict[str, str]]]:
    """A key server process (``settings``: extra environment) and a token per role."""
    database = f"sqlite:///{tmp / 'trustfleet.db'}"
    env = {**node_environment(database, tmp), "TRUSTFLEET_TMK_SESSION_SECONDS": "10", **settings}
    admin = admin_token_for(database)
    with running_nodes(env, tmp, count=1) as (node,):
        headers = {"Authorization": f"Bearer {admin}"}
        tokens = {"admin": admin}
        for role in ("device-gateway", "manufacturer", "operator"):
            answer = httpx.post(
                node.url + "/v1/tokens", json={"name": role, "role": role}, headers=headers
            )
            tokens[role] = answer.json()["token"]
        yield node, tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, dict[str, str]]]:
    with _server(tmp_path_factory.mktemp("conformance-server")) as running:
        yield running


class Gateway:
    """A device gateway: forwards the download steps (and only them) to the key server
    with its own token. ``tamper`` flips a bit of every delivered TMK, as a broken
    gateway might."""

    def __init__(self, upstream: str, token: str, *, tamper: bool = False) -> None:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if not self.path.startswith("/v1/tmk/downloads"):
                    self.send_error(404)
                    return
                answer = httpx.post(
                    upstream + self.path,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": self.headers.get("Content-Type", "application/json"),
                    },
                    timeout=30,
                )
                content = gateway.rewrite(answer.content) if tamper else answer.content
                self.send_response(answer.status_code)
                for name in ("Content-Type", "Date"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def rewrite(content: bytes) -> bytes:
        try:
            message = json.loads(content)
        except ValueError:
            return content
        if not isinstance(message, dict) or message.get("type") != "tmk-key-delivery":
            return content
        wrapped = bytearray(base64.b64decode(message["wrapped_tmk"]))
        wrapped[-1] ^= 1
        message["wrapped_tmk"] = base64.b64encode(bytes(wrapped)).decode()
        return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()

    def __enter__(self) -> Gateway:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _conformance(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = run_cli(tmp_path / "cli", "tmk", "conformance", *args, check=False)
    return result.returncode, result.stdout + result.stderr


def _write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text(json.dumps(tokens))
    return path


# =====================================================================================
# Runs
# =====================================================================================


@pytest.mark.slow
def test_every_check_passes_against_the_key_server(
    server: tuple[Node, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, tokens = server
    for role, variable in TOKEN_VARIABLES.items():  # from the environment this time
        monkeypatch.setenv(variable, tokens[role])
    status, output = _conformance(tmp_path, "--server", node.url, "--output", "json")
    assert status == 0, output
    report = json.loads(output)
    assert report["passed"] is True, output
    assert report["summary"] == {"pass": len(ALL_CHECKS), "fail": 0, "skip": 0}
    assert [r["name"] for r in report["results"]] == ALL_CHECKS
    assert {r["suite"] for r in report["results"] if r["name"] == "download"} == {
        "p256",
        "rsa-2048",
        "rsa-3072",
        "sm2",
    }
    expired = next(r for r in report["results"] if r["name"] == "expired-at-server")
    assert expired["got"].startswith("410 tmk-session-expired after")
    results = {r["name"]: r["got"] for r in report["results"]}
    assert results["download-v1"].startswith("v1, aes-128: active")  # v1 terminals still work
    assert results["downgrade"] == (
        "terminal: tmk-version-mismatch, then terminal: tmk-bad-server-signature; abort 200"
    )
    assert results["forged-delivery"] == (
        "terminal: tmk-bad-delivery-signature, no TMK installed; abort 200"
    )
    assert report["protocol_versions"] == [1, 2]
    for value in tokens.values():
        assert value not in output


@pytest.mark.slow
def test_every_check_passes_through_a_gateway_and_prints_a_table(
    server: tuple[Node, dict[str, str]], tmp_path: Path
) -> None:
    node, tokens = server
    mine = _write_tokens(tmp_path / "tokens.json", {**tokens, "device-gateway": "the-gateway's"})
    with Gateway(node.url, tokens["device-gateway"]) as gateway:
        status, output = _conformance(
            tmp_path,
            *("--server", gateway.url, "--api", node.url, "--tokens", str(mine)),
            *("--suite", "sm2", "--no-wait-for-expiry"),
        )
    assert status == 0, output
    assert "PASSED: 21 passed, 0 failed, 1 skipped" in output, output
    assert "expired-at-server" in output and "--no-wait-for-expiry" in output


@pytest.mark.slow
def test_a_gateway_that_breaks_the_protocol_fails_the_run(
    server: tuple[Node, dict[str, str]], tmp_path: Path
) -> None:
    node, tokens = server
    mine = _write_tokens(tmp_path / "tokens.json", tokens)
    with Gateway(node.url, tokens["device-gateway"], tamper=True) as gateway:
        status, output = _conformance(
            tmp_path,
            *("--server", gateway.url, "--api", node.url, "--tokens", str(mine)),
            *("--suite", "p256", "--no-wait-for-expiry", "--output", "json"),
        )
    assert status == 1, output
    report = json.loads(output)
    assert report["passed"] is False
    results = {r["name"]: r for r in report["results"]}
    assert results["download"]["outcome"] == "fail"
    # the terminal speaks version 2: the work key's signature no longer covers the delivery
    assert results["download"]["got"] == "tmk-bad-delivery-signature"
    assert results["download-v1"]["got"] == "tmk-unwrap-failed"  # version 1 opens it first
    assert results["wrong-root"]["outcome"] == "pass"  # what the gateway does not touch
    assert results["unknown-terminal"]["outcome"] == "pass"


@pytest.mark.slow
def test_against_a_server_that_refuses_version_1_every_check_passes(tmp_path: Path) -> None:
    """``tmk_min_protocol_version = 2``: a version 1 terminal, and a request downgraded to
    version 1 on the way, are refused by the server itself; version 2 works as before."""
    with _server(tmp_path / "server", TRUSTFLEET_TMK_MIN_PROTOCOL_VERSION="2") as (node, tokens):
        mine = _write_tokens(tmp_path / "tokens.json", tokens)
        status, output = _conformance(
            tmp_path,
            *("--server", node.url, "--tokens", str(mine), "--suite", "p256"),
            *("--no-wait-for-expiry", "--output", "json"),
        )
    assert status == 0, output
    results = {r["name"]: r for r in json.loads(output)["results"]}
    assert results["download-v1"]["got"] == (
        "400 tmk-unsupported-version: the server refuses version 1"
    )
    assert (
        results["downgrade"]["got"] == "server: 400 tmk-unsupported-version (it refuses version 1)"
    )
    assert results["download"]["got"].startswith("aes-128: active")
    assert results["forged-delivery"]["outcome"] == "pass"


@pytest.mark.slow
def test_without_the_operator_and_admin_tokens_their_checks_are_skipped_and_a_wrong_token_fails(
    server: tuple[Node, dict[str, str]], tmp_path: Path
) -> None:
    node, tokens = server
    required = {role: tokens[role] for role in ("device-gateway", "manufacturer")}
    mine = _write_tokens(tmp_path / "tokens.json", required)
    status, output = _conformance(
        tmp_path,
        *("--server", node.url, "--tokens", str(mine), "--suite", "p256"),
        *("--no-wait-for-expiry", "--output", "json"),
    )
    assert status == 0, output
    skipped = {r["name"] for r in json.loads(output)["results"] if r["outcome"] == "skip"}
    assert skipped == {
        "tmk-algorithms",
        "expired-at-server",
        "revoked-work-certificate",
        "revoked-terminal",
    }

    wrong = _write_tokens(
        tmp_path / "wrong.json", {**required, "device-gateway": tokens["operator"]}
    )
    status, output = _conformance(
        tmp_path,
        *("--server", node.url, "--tokens", str(wrong), "--suite", "p256"),
        *("--no-wait-for-expiry", "--output", "json"),
    )
    assert status == 1, output
    results = {r["name"]: r for r in json.loads(output)["results"]}
    assert results["unknown-terminal"]["got"] == "403 forbidden"


# =====================================================================================
# Tokens
# =====================================================================================


def test_tokens_come_from_a_file_or_the_environment(tmp_path: Path) -> None:
    environ = {TOKEN_VARIABLES["device-gateway"]: "g", TOKEN_VARIABLES["manufacturer"]: "m"}
    assert load_tokens(None, environ) == {"device-gateway": "g", "manufacturer": "m"}
    path = _write_tokens(
        tmp_path / "t.json", {"device-gateway": "G", "manufacturer": "M", "x": "y"}
    )
    assert load_tokens(path, environ) == {"device-gateway": "G", "manufacturer": "M"}
    with pytest.raises(InvalidInput, match="manufacturer"):
        load_tokens(None, {TOKEN_VARIABLES["device-gateway"]: "g"})
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(InvalidInput):
        load_tokens(tmp_path / "bad.json", environ)


def test_the_command_takes_no_token_on_its_command_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "tmk", "conformance", "--help")
    assert "--token " not in result.stdout and "--tokens" in result.stdout
    refused = run_cli(
        tmp_path,
        "tmk",
        "conformance",
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "x",
        check=False,
    )
    assert refused.returncode == 2 and "No such option" in refused.stdout + refused.stderr
