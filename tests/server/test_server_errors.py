"""Bad input of every kind gets a 4xx problem+json with a code; never a bare 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from trustfleet.errors import Conflict, KeyNotFound
from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext
from trustfleet.server.deps import public
from trustfleet.server.limits import streamed_import
from trustfleet.server.middleware import BodyLimitMiddleware

from .conftest import MAX_BODY_BYTES, assert_problem, bearer


class Echo(BaseModel):
    value: int


def _test_router() -> APIRouter:
    router = APIRouter(prefix="/v1/test", dependencies=[Depends(public)])

    @router.get("/crash")
    def crash() -> None:
        raise RuntimeError("database password is hunter2")  # must not reach the caller

    @router.get("/conflict")
    def conflict() -> None:
        raise Conflict("the terminal is already registered")

    @router.get("/missing-key")
    def missing_key() -> None:
        raise KeyNotFound()

    @router.post("/echo")
    def echo(body: Echo) -> Echo:
        return body

    @router.post("/import")
    @streamed_import
    async def bulk_import(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    return router


@pytest.fixture
def test_app(context: AppContext) -> FastAPI:
    app = create_app(context)
    app.include_router(_test_router())
    return app


@pytest.fixture
def test_client(test_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(test_app, raise_server_exceptions=False) as client:
        yield client


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        chunk = b"7" * min(size, total - sent)
        sent += len(chunk)
        yield chunk


# --- routing errors ---------------------------------------------------------------------


def test_unknown_route_is_404_problem(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/nothing-here"), 404, "not-found")
    assert body["instance"] == "/v1/nothing-here"


def test_huge_unknown_path_is_not_echoed(client: TestClient) -> None:
    path = "/v1/" + "z" * 5000
    response = client.get(path)
    assert_problem(response, 404, "not-found")
    assert "z" * 300 not in response.text


def test_wrong_method_is_405_problem(client: TestClient, tokens: dict[str, str]) -> None:
    response = client.put("/v1/tokens", headers=bearer(tokens["admin"]), json={})
    assert_problem(response, 405, "method-not-allowed")
    # every method of the path, whichever route serves it (FastAPI names only the first's)
    assert response.headers["allow"] == "GET, OPTIONS, POST"
    healthz = client.post("/healthz")
    assert_problem(healthz, 405, "method-not-allowed")
    assert healthz.headers["allow"] == "GET, OPTIONS"


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"name": 5, "role": "admin"},
        {"name": "x"},
        {"role": "admin"},
        {"name": "x", "role": "root"},
        {"name": "x", "role": ["admin"]},
        {"name": "", "role": "admin"},
        {"name": "x", "role": "admin", "extra": 1},
        [],
        "a string",
        None,
        12,
    ],
)
def test_wrong_shapes_are_422_with_field_errors(
    client: TestClient, tokens: dict[str, str], payload: Any
) -> None:
    response = client.post("/v1/tokens", headers=bearer(tokens["admin"]), json=payload)
    body = assert_problem(response, 422, "invalid-request")
    assert body["errors"] and all({"loc", "msg", "type"} == set(e) for e in body["errors"])


def test_validation_errors_do_not_echo_input(client: TestClient, tokens: dict[str, str]) -> None:
    long_name = "N" * 3000
    long_key = "K" * 1000
    response = client.post(
        "/v1/tokens",
        headers=bearer(tokens["admin"]),
        json={"name": long_name, "role": "admin", long_key: "SECRETVALUE"},
    )
    assert_problem(response, 422, "invalid-request")
    assert "N" * 100 not in response.text
    assert "K" * 100 not in response.text
    assert "SECRETVALUE" not in response.text


def test_malformed_json_is_400(client: TestClient, tokens: dict[str, str]) -> None:
    for raw in (
        b"{",
        b'{"name": "x", "role": }',
        b"\xff\xfe\x00",
        b"NaN-ish",
        b'{"a":1}}',
        b"\x00",
    ):
        response = client.post(
            "/v1/tokens",
            headers={**bearer(tokens["admin"]), "content-type": "application/json"},
            content=raw,
        )
        assert_problem(response, 400, "malformed-json")


def test_json_without_content_type_is_refused(client: TestClient, tokens: dict[str, str]) -> None:
    response = client.post(
        "/v1/tokens",
        headers=bearer(tokens["admin"]),
        content=json.dumps({"name": "x", "role": "admin"}).encode(),
    )
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)


def test_deeply_nested_json_is_a_4xx(client: TestClient, tokens: dict[str, str]) -> None:
    raw = b"[" * (MAX_BODY_BYTES - 10)
    response = client.post(
        "/v1/tokens",
        headers={**bearer(tokens["admin"]), "content-type": "application/json"},
        content=raw,
    )
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)


# --- body size --------------------------------------------------------------------------


def test_body_over_the_limit_with_content_length_is_413(
    client: TestClient, tokens: dict[str, str]
) -> None:
    payload = json.dumps({"name": "x" * MAX_BODY_BYTES, "role": "admin"}).encode()
    response = client.post(
        "/v1/tokens",
        headers={**bearer(tokens["admin"]), "content-type": "application/json"},
        content=payload,
    )
    assert_problem(response, 413, "body-too-large")


def test_body_over_the_limit_without_content_length_is_413(
    client: TestClient, tokens: dict[str, str]
) -> None:
    response = client.post(
        "/v1/tokens",
        headers={**bearer(tokens["admin"]), "content-type": "application/json"},
        content=_chunks(MAX_BODY_BYTES + 1),
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body-too-large")


def test_body_at_the_limit_is_accepted(test_client: TestClient) -> None:
    padding = " " * (MAX_BODY_BYTES - len('{"value": 7}'))
    body = ('{"value": 7}' + padding).encode()
    assert len(body) == MAX_BODY_BYTES
    response = test_client.post(
        "/v1/test/echo", headers={"content-type": "application/json"}, content=body
    )
    assert response.status_code == 200 and response.json() == {"value": 7}


def test_streamed_import_routes_get_the_import_limit(
    test_client: TestClient, settings: Any
) -> None:
    big = settings.max_body_bytes * 4
    assert test_client.post("/v1/test/import", content=_chunks(big)).json() == {"bytes": big}
    over = test_client.post("/v1/test/import", content=_chunks(settings.max_import_bytes + 1))
    assert_problem(over, 413, "body-too-large")
    huge_declared = test_client.post(
        "/v1/test/import",
        headers={"content-length": str(settings.max_import_bytes + 1)},
        content=b"",
    )
    assert_problem(huge_declared, 413, "body-too-large")


def _asgi_call(
    app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> list[dict[str, Any]]:
    import anyio

    sent: list[dict[str, Any]] = []
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
    anyio.run(app, scope, receive, send)
    return sent


def test_too_large_content_length_is_refused_before_reading() -> None:
    called = False

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        nonlocal called
        called = True

    middleware = BodyLimitMiddleware(inner, limit_for=lambda _scope: 100)
    sent = _asgi_call(middleware, [(b"content-length", b"101")], [b"x" * 101])
    assert not called
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "body-too-large"


def test_streamed_body_is_counted_across_chunks() -> None:
    async def reads_everything(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BodyLimitMiddleware(reads_everything, limit_for=lambda _scope: 100)
    assert _asgi_call(middleware, [], [b"x" * 50, b"x" * 50])[0]["status"] == 200
    assert _asgi_call(middleware, [], [b"x" * 50, b"x" * 50, b"x"])[0]["status"] == 413


def test_non_numeric_content_length_is_400() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("must not be called")

    middleware = BodyLimitMiddleware(inner, limit_for=lambda _scope: 100)
    sent = _asgi_call(middleware, [(b"content-length", b"12abc")], [b""])
    assert sent[0]["status"] == 400


# --- errors from handlers ---------------------------------------------------------------


def test_trustfleet_errors_map_to_their_code_and_status(test_client: TestClient) -> None:
    body = assert_problem(test_client.get("/v1/test/conflict"), 409, "conflict")
    assert body["detail"] == "the terminal is already registered"
    assert_problem(test_client.get("/v1/test/missing-key"), 404, "key-not-found")


def test_unexpected_exception_is_a_generic_500_logged_with_request_id(
    test_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="trustfleet.server"):
        response = test_client.get("/v1/test/crash", headers={"X-Request-ID": "req-crash-1"})
    body = assert_problem(response, 500, "internal-error")
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert body["request_id"] == "req-crash-1" == response.headers["x-request-id"]
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "hunter2" in str(logged[0].exc_info[1])  # kept for the operator
