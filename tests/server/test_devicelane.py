"""The device lane answers device routes exactly as their FastAPI routes would: same
status, body bytes, headers, refusal audit, metrics and access line; anything that is not
an exact match goes on to FastAPI."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.server.app import DOMAIN_ROUTERS, create_app, load_device_routes
from trustfleet.server.context import AppContext
from trustfleet.server.devicelane import DeviceRoute
from trustfleet.server.logging import configure_logging
from trustfleet.store.audit import iter_records

from . import toy_device_domain as toy
from .conftest import MAX_BODY_BYTES, assert_problem, bearer
from .helpers import api_routes, is_public, role_requirements

ECHO = "/v1/toy/echo/abc"
DOMAINS = (toy.__name__, "trustfleet.server.api")


@pytest.fixture
def lanes(context: AppContext) -> Iterator[dict[str, TestClient]]:
    """The same domains served with the device lane and without it."""
    with (
        TestClient(
            create_app(context, domain_routers=DOMAINS),
            raise_server_exceptions=False,
            client=("192.0.2.1", 50000),
        ) as on,
        TestClient(  # another client: refused tokens are audited once per client and window
            create_app(context, domain_routers=DOMAINS, device_lane=False),
            raise_server_exceptions=False,
            client=("192.0.2.2", 50000),
        ) as off,
    ):
        yield {"lane": on, "fastapi": off}


def _both(lanes: dict[str, TestClient], **request: Any) -> dict[str, Any]:
    """Send the same request to both apps; return both responses after checking that they
    agree on status, content type and body (request ids aside)."""
    answers = {name: client.request(**request) for name, client in lanes.items()}
    lane, fastapi = answers["lane"], answers["fastapi"]
    assert lane.status_code == fastapi.status_code, (lane.text, fastapi.text)
    assert lane.headers["content-type"] == fastapi.headers["content-type"]
    assert lane.headers.get("www-authenticate") == fastapi.headers.get("www-authenticate")
    assert lane.headers.get("connection") == fastapi.headers.get("connection")
    assert _without_request_id(lane.content) == _without_request_id(fastapi.content)
    return answers


def _without_request_id(content: bytes) -> Any:
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if isinstance(body, dict):
        body.pop("request_id", None)
        body["detail"] = str(body.get("detail", "")).split(" under request id")[0]
    return body


def test_a_device_route_answers_alike_on_both_lanes(
    lanes: dict[str, TestClient], tokens: dict[str, str]
) -> None:
    answers = _both(
        lanes, method="POST", url=ECHO, content=b"hello", headers=bearer(tokens["operator"])
    )
    assert answers["lane"].status_code == 201
    assert answers["lane"].json()["item"] == "abc" and answers["lane"].json()["size"] == 5
    for response in answers.values():
        assert len(response.headers["x-request-id"]) == 16
    traced = lanes["lane"].post(
        ECHO, content=b"", headers={**bearer(tokens["operator"]), "X-Request-ID": "trace-7"}
    )
    assert traced.headers["x-request-id"] == "trace-7"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "authentication-required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "authentication-required"),
        ({"Authorization": "Bearer tf_" + "Q" * 43}, 401, "authentication-required"),
        ("admin", 403, "forbidden"),
    ],
    ids=["missing", "not-bearer", "unknown", "wrong-role"],
)
def test_refusals_answer_alike_and_are_audited_once_on_the_lane(
    lanes: dict[str, TestClient],
    tokens: dict[str, str],
    sessions: sessionmaker[Session],
    headers: dict[str, str] | str,
    status: int,
    code: str,
) -> None:
    sent = bearer(tokens[headers]) if isinstance(headers, str) else headers
    before = _records(sessions)
    answers = _both(lanes, method="POST", url=ECHO, content=b"x", headers=sent)
    assert_problem(answers["lane"], status, code)
    records = _records(sessions)[len(before) :]
    action = "auth.forbidden" if status == 403 else "auth.failed"
    assert [(r["action"], r["subject"]) for r in records] == [
        (action, "POST /v1/toy/echo/{item}")
    ] * 2  # one per lane


def _records(sessions: sessionmaker[Session]) -> list[dict[str, str]]:
    with sessions() as session:
        return [{"action": r.action, "subject": r.subject} for r in iter_records(session)]


def test_errors_of_the_handler_answer_alike(
    lanes: dict[str, TestClient], tokens: dict[str, str]
) -> None:
    operator = bearer(tokens["operator"])
    failed = _both(lanes, method="POST", url=ECHO, content=b"fail", headers=operator)
    body = assert_problem(failed["lane"], 409, "toy-conflict")
    assert body["instance"] == ECHO and body["request_id"] == failed["lane"].headers["x-request-id"]
    crashed = _both(lanes, method="POST", url=ECHO, content=b"boom", headers=operator)
    body = assert_problem(crashed["lane"], 500, "internal-error")
    assert "unexpected" not in crashed["lane"].text  # the cause is logged, not told


def test_the_body_limit_holds_on_the_lane(
    lanes: dict[str, TestClient], tokens: dict[str, str]
) -> None:
    operator = bearer(tokens["operator"])
    too_large = b"x" * (MAX_BODY_BYTES + 1)
    declared = _both(lanes, method="POST", url=ECHO, content=too_large, headers=operator)
    assert_problem(declared["lane"], 413, "body-too-large")
    assert declared["lane"].headers["connection"] == "close"
    streamed = lanes["lane"].post(
        ECHO, content=iter([too_large[:100], too_large[100:]]), headers=operator
    )
    assert_problem(streamed, 413, "body-too-large")
    bad_length = _both(
        lanes, method="POST", url=ECHO, content=b"x", headers={**operator, "Content-Length": "x1"}
    )
    assert_problem(bad_length["lane"], 400, "bad-request")
    at_limit = lanes["lane"].post(ECHO, content=b"x" * MAX_BODY_BYTES, headers=operator)
    assert at_limit.status_code == 201 and at_limit.json()["size"] == MAX_BODY_BYTES


def test_what_the_lane_does_not_match_goes_on_to_fastapi(
    lanes: dict[str, TestClient], tokens: dict[str, str]
) -> None:
    operator = bearer(tokens["operator"])
    bad_item = _both(lanes, method="POST", url="/v1/toy/echo/ABC", content=b"", headers=operator)
    assert_problem(bad_item["lane"], 422, "invalid-request")
    wrong_method = _both(lanes, method="GET", url=ECHO, headers=operator)
    assert_problem(wrong_method["lane"], 405, "method-not-allowed")
    longer = _both(lanes, method="POST", url=ECHO + "/more", content=b"", headers=operator)
    assert_problem(longer["lane"], 404, "not-found")


def test_the_lane_logs_and_counts_by_route_template(
    lanes: dict[str, TestClient], tokens: dict[str, str]
) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("INFO", stream=stream)
    try:
        lanes["lane"].post(ECHO, content=b"", headers=bearer(tokens["operator"]))
        lanes["lane"].post(ECHO, content=b"fail", headers=bearer(tokens["operator"]))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "trustfleet.access"]
    assert [(a["route"], a["status"], a["path"]) for a in access] == [
        ("/v1/toy/echo/{item}", 201, ECHO),
        ("/v1/toy/echo/{item}", 409, ECHO),
    ]
    metrics = lanes["lane"].get("/metrics").text
    assert 'route="/v1/toy/echo/{item}",status="201"' in metrics
    assert "/v1/toy/echo/abc" not in metrics


def test_every_device_route_has_a_fastapi_route_admitting_the_same_roles(
    context: AppContext,
) -> None:
    app = create_app(context)
    routes = load_device_routes(DOMAIN_ROUTERS)
    assert routes, "the TMK download steps are device routes"
    for device in routes:
        assert isinstance(device, DeviceRoute)
        matching = [
            route
            for route in api_routes(app)
            if route.path == device.path and device.method in route.methods
        ]
        assert len(matching) == 1, device.path
        if device.public:  # no token: the handler authenticates the request itself
            assert is_public(matching[0]) and not role_requirements(matching[0])
            assert device.roles == frozenset()
            continue
        (requirement,) = role_requirements(matching[0])
        assert requirement.roles == device.roles


def test_the_lane_makes_one_thread_hop_on_postgresql_and_none_on_sqlite(
    lanes: dict[str, TestClient],
    tokens: dict[str, str],
    context: AppContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token check (and its last-used refresh, due on a token's first use) and the
    handler are one piece of database work."""
    import anyio.to_thread

    hops: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(function)
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    response = lanes["lane"].post(ECHO, content=b"hi", headers=bearer(tokens["operator"]))
    assert response.status_code == 201
    assert len(hops) == (1 if context.engine.dialect.name == "postgresql" else 0)
