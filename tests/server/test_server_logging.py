"""JSON-lines logs: one object per line with the request's context, and no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from trustfleet.server.logging import MAX_TEXT_CHARS, REDACTED, configure_logging, redact_text

from .conftest import bearer


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything logged, at DEBUG, as the configured JSON handler writes it."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("DEBUG", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_one_json_object(log_stream: io.StringIO) -> None:
    log = logging.getLogger("trustfleet.test")
    log.info("plain %s", "message")
    log.warning("multi\nline\nmessage")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = _lines(log_stream)
    assert [line["msg"] for line in lines] == ["plain message", "multi\nline\nmessage", "failed"]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert lines[1]["level"] == "WARNING" and lines[0]["logger"] == "trustfleet.test"
    assert "ValueError: boom" in lines[2]["exc"]


def test_access_line_has_request_context(client: TestClient, log_stream: io.StringIO) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    access = [line for line in _lines(log_stream) if line["logger"] == "trustfleet.access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == "trace-42" == response.headers["x-request-id"]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", 200)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0


def test_log_lines_inside_a_request_carry_its_id(
    client: TestClient, log_stream: io.StringIO
) -> None:
    client.get("/v1/tokens", headers=bearer("tf_wrong"))
    lines = [line for line in _lines(log_stream) if line["logger"] == "trustfleet.server.auth"]
    assert lines and lines[0]["msg"] == "authentication failed: unknown"
    assert len(lines[0]["request_id"]) == 16


def test_token_text_never_reaches_the_logs(
    client: TestClient, tokens: dict[str, str], log_stream: io.StringIO
) -> None:
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # log SQL and parameters
    try:
        created = client.post(
            "/v1/tokens", headers=bearer(tokens["admin"]), json={"name": "tms", "role": "operator"}
        )
        assert created.status_code == 201
        new_token = created.json()["token"]
        client.get("/v1/tokens", headers=bearer(new_token))
        client.get("/v1/tokens", headers=bearer(new_token[:-2]))
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    text = log_stream.getvalue()
    assert len(text.splitlines()) > 5  # SQL was logged, so the check below means something
    for token in (new_token, tokens["admin"]):
        assert token not in text
        assert token[3:20] not in text


def test_secrets_in_messages_and_fields_are_masked(log_stream: io.StringIO) -> None:
    log = logging.getLogger("trustfleet.test")
    hex_key = "a1b2c3d4" * 8
    log.info("loaded key material %s", hex_key)
    log.info("config: password=hunter2 pin: 1234 user=alice")
    log.info("request", extra={"api_token": "tf_abc", "master_key": b"\x01" * 32, "key_id": "k-7"})
    log.info("got %s", {"secret": "s3cr3t", "label": "ok"})
    log.info("Authorization: Bearer abcdefgh")
    lines = _lines(log_stream)
    assert hex_key not in lines[0]["msg"] and REDACTED in lines[0]["msg"]
    assert "hunter2" not in lines[1]["msg"] and "1234" not in lines[1]["msg"]
    assert "user=alice" in lines[1]["msg"]
    assert lines[2]["api_token"] == REDACTED and lines[2]["master_key"] == REDACTED
    assert lines[2]["key_id"] == "k-7"  # identifiers stay readable
    assert "s3cr3t" not in lines[3]["msg"] and "ok" in lines[3]["msg"]
    assert "abcdefgh" not in lines[4]["msg"]


def test_secrets_in_exception_text_are_masked(log_stream: io.StringIO) -> None:
    try:
        raise RuntimeError("could not open: password=hunter2 " + "ab" * 40)
    except RuntimeError:
        logging.getLogger("trustfleet.test").exception("failed")
    line = _lines(log_stream)[0]
    assert "hunter2" not in line["exc"] and "ab" * 40 not in line["exc"]


@pytest.mark.parametrize(
    "text",
    [
        "GET /v1/tokens/12 -> 200",
        "issued certificate for device-0042",
        "request id 9f86d081884c7d65",  # 16 hex: an id, not key material
        "the quick brown fox jumps over the lazy dog",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "text, secret",
    [
        ("blob " + "0f" * 17, "0f" * 17),
        ("b64 " + "Zm9vYmFyYmF6cXV4Cg0KZm9vYmFyYmF6cXV4Cg0KZm9vYmF6", "Zm9vYmFyYmF6cXV4Cg0K"),
        ("token tf_Q2hlY2sgdGhpcyB0b2tlbiBvdXQ", "tf_Q2hlY2sgdGhpcyB0b2tl"),
        ('{"private_key": "MC4CAQAwBQYDK2VwBCIEI"}', "MC4CAQAwBQYDK2VwBCIEI"),
        ("-----BEGIN PRIVATE KEY-----\nMC4CAQ\n-----END PRIVATE KEY-----", "MC4CAQ"),
        ("private_key=" + "q" * 3000 + " tail", "q" * 20),
        ("config: password=hunter2", "hunter2"),
    ],
)
def test_secret_shapes_are_masked(text: str, secret: str) -> None:
    assert secret not in redact_text(text)


@pytest.mark.parametrize("text", ["key" * 5000, "a" * 20000, "password" * 3000, "x=" * 9000])
def test_hostile_text_is_cut_and_redacted(text: str) -> None:
    # paths and headers are attacker-chosen: redaction must stay linear (these inputs took
    # minutes with a backtracking pattern) and bounded in size
    assert len(redact_text(text)) <= MAX_TEXT_CHARS + len("…[truncated]")
