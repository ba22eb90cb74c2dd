"""The OpenAPI document is the truth: every operation declares the problems it can give,
every request body its media types, ``OPTIONS`` and 405 list the path's methods, and a body
of the wrong shape is refused with a problem, never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from trustfleet.server.openapi import PROBLEM_SCHEMA, complete_openapi
from trustfleet.server.problems import PROBLEM_MEDIA_TYPE
from trustfleet.store import MAX_INTEGER, Database

from .conftest import assert_problem, bearer
from .helpers import api_routes, role_requirements

METHODS = ("get", "put", "post", "delete", "patch")
PROBLEM_REF = f"#/components/schemas/{PROBLEM_SCHEMA}"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, item[method])
        for path, item in spec["paths"].items()
        for method in METHODS
        if method in item
    ]


def fill(path: str, parameters: list[dict[str, Any]]) -> str:
    """``path`` with each parameter a value its pattern admits."""
    for parameter in parameters:
        if parameter["in"] != "path":
            continue
        pattern = parameter["schema"].get("pattern", "")
        value = "0" * 32 if "{32}" in pattern else "123456789"
        path = path.replace("{" + parameter["name"] + "}", value)
    return path


@pytest.fixture
def spec(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def test_every_operation_declares_the_problems_it_can_give(spec: dict[str, Any]) -> None:
    assert len(operations(spec)) > 50
    for path, method, operation in operations(spec):
        label = f"{method.upper()} {path}"
        responses = operation["responses"]
        expected = {"5XX"}
        where = {parameter["in"] for parameter in operation.get("parameters", [])}
        if operation.get("security"):
            expected |= {"401", "403"}
        if "path" in where:
            expected |= {"400", "404", "422"}
        if "requestBody" in operation:
            expected |= {"400", "404", "413", "415", "422"}
        if method in ("post", "put", "patch", "delete"):
            expected |= {"409"}
        assert expected <= set(responses), (label, sorted(expected - set(responses)))
        for status, response in responses.items():
            if status[0] in "45":
                assert response["description"], (label, status)
                content = response["content"]
                assert list(content) == [PROBLEM_MEDIA_TYPE], (label, status)
                assert content[PROBLEM_MEDIA_TYPE]["schema"] == {"$ref": PROBLEM_REF}
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # every 422 is a problem now
    assert set(schemas[PROBLEM_SCHEMA]["required"]) == {"type", "title", "status", "detail", "code"}


def test_every_request_body_names_its_media_types(spec: dict[str, Any]) -> None:
    bodies = {
        (method.upper(), path): operation["requestBody"]
        for path, method, operation in operations(spec)
        if "requestBody" in operation
    }
    for label, body in bodies.items():
        assert body["content"], label
        for media_type, declared in body["content"].items():
            assert "schema" in declared, (label, media_type)
    # the device steps, the bulk imports and the SMS webhook take raw bodies
    assert "application/json" in bodies["POST", "/v1/tmk/downloads/{session_id}/proof"]["content"]
    for label in [("POST", "/v1/tmk/terminals/import"), ("PUT", "/v1/keysync/imports/{import_id}")]:
        assert {"text/csv", "application/x-ndjson"} <= set(bodies[label]["content"]), label
    sms = bodies["POST", "/v1/keysync/sms/{gateway}"]["content"]
    assert list(sms) == ["application/x-www-form-urlencoded"]


def test_a_public_route_declares_what_only_it_knows(spec: dict[str, Any]) -> None:
    sms = spec["paths"]["/v1/keysync/sms/{gateway}"]["post"]
    assert "security" not in sms and "401" not in sms["responses"]
    assert "403" in sms["responses"]  # unknown gateway, bad signature: the handler's own
    assert "404" in spec["paths"]["/v1/tmk/identity"]["get"]["responses"]


def test_every_guarded_operation_names_its_roles(app: FastAPI, spec: dict[str, Any]) -> None:
    for route in api_routes(app):
        if not route.include_in_schema:
            continue
        requirements = role_requirements(route)
        for method in route.methods:
            operation = spec["paths"][route.path_format][method.lower()]
            if not requirements:
                assert "x-roles" not in operation
                continue
            admitted = frozenset.intersection(*(r.roles for r in requirements))
            assert operation["x-roles"] == sorted(admitted), route.path_format
            assert "Roles: " in operation["description"]


def test_completing_keeps_what_a_route_declared() -> None:
    operation = {
        "responses": {
            "200": {"description": "ok"},
            "410": {"description": "Gone for good", "content": {"application/json": {}}},
        }
    }
    spec = complete_openapi({"paths": {"/things/{id}": {"get": operation}}})
    responses = spec["paths"]["/things/{id}"]["get"]["responses"]
    assert responses["410"]["description"] == "Gone for good"
    assert list(responses["410"]["content"]) == [PROBLEM_MEDIA_TYPE]
    assert list(responses) == ["200", "410", "5XX"]  # no input, no token: nothing else


def test_options_lists_every_method_of_each_path(client: TestClient, spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        url = fill(path, [p for m in METHODS if m in item for p in item[m].get("parameters", [])])
        response = client.options(url)  # no token: the methods are public anyway
        assert response.status_code == 204, (url, response.text)
        documented = {method.upper() for method in item if method in METHODS}
        assert response.headers["allow"] == ", ".join(sorted({*documented, "OPTIONS"})), url
        assert response.content == b""


def test_options_of_an_unknown_path_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.options("/v1/no-such-thing"), 404, "not-found")


def test_a_concrete_path_is_not_its_templated_neighbour(client: TestClient) -> None:
    # /v1/tmk/terminals/import also matches /v1/tmk/terminals/{sn}: its methods are its own
    assert client.options("/v1/tmk/terminals/import").headers["allow"] == "OPTIONS, POST"
    assert client.options("/v1/tmk/terminals/T1").headers["allow"] == "GET, OPTIONS"


def test_an_undeclared_method_is_405_with_the_paths_methods(
    client: TestClient, spec: dict[str, Any], tokens: dict[str, str]
) -> None:
    for path, item in spec["paths"].items():
        url = fill(path, [p for m in METHODS if m in item for p in item[m].get("parameters", [])])
        documented = {method.upper() for method in item if method in METHODS}
        wrong = next(m for m in ("PATCH", "PUT", "DELETE", "GET") if m not in documented)
        response = client.request(wrong, url, headers=bearer(tokens["admin"]))
        assert_problem(response, 405, "method-not-allowed")
        assert response.headers["allow"] == ", ".join(sorted({*documented, "OPTIONS"})), url


#: bulk imports whose lines are refused one by one in their report, each with a code
ROW_BY_ROW_IMPORTS = {"/v1/keysync/imports/{import_id}", "/v1/tmk/terminals/import"}
WRONG_SHAPES = {
    "application/json": b'[["not", "an", "object"], 1, null]',
    "application/x-www-form-urlencoded": b"%%%=&&&",
    "text/csv": b"\x00\x01,not,the,header\n\xff\xfe\n",
    "application/x-ndjson": b'[1, 2]\n"a string"\n{"no": "fields"}\n',
    "application/jsonl": b"{{{\n",
    "application/x-keysync-manifest": b"not.a.jws\n",
}


def test_a_body_of_the_wrong_shape_is_refused_with_a_problem(
    client: TestClient, spec: dict[str, Any], tokens: dict[str, str]
) -> None:
    """Every request body, in every media type it takes, refused: a 4xx problem, never a
    5xx and never an acceptance."""
    checked = 0
    for path, method, operation in operations(spec):
        if "requestBody" not in operation:
            continue
        url = fill(path, operation.get("parameters", []))
        role = operation.get("x-roles", ["admin"])[0]
        for media_type in operation["requestBody"]["content"]:
            response = client.request(
                method.upper(),
                url,
                content=WRONG_SHAPES[media_type],
                headers={**bearer(tokens[role]), "Content-Type": media_type},
            )
            label = f"{method.upper()} {path} {media_type}: {response.text[:300]}"
            checked += 1
            if response.status_code == 200 and path in ROW_BY_ROW_IMPORTS:
                report = response.json()  # refused row by row, each row with its code
                rejected = report["rejected"]  # a count, or the rows themselves
                assert report["accepted"] == 0, label
                assert (len(rejected) if isinstance(rejected, list) else rejected) > 0, label
                continue
            assert 400 <= response.status_code < 500, label
            assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE), label
            assert str(response.status_code) in operation["responses"], label
    assert checked > 30


def test_a_json_body_in_an_undeclared_media_type_is_refused(
    client: TestClient, tokens: dict[str, str]
) -> None:
    response = client.post(
        "/v1/tokens",
        content=b'{"name": "x", "role": "admin"}',
        headers={**bearer(tokens["admin"]), "Content-Type": "text/plain"},
    )
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)


# --- found by schemathesis (tests/server/test_schemathesis.py) ---------------------------


@pytest.mark.parametrize(
    ("url", "role"),
    [
        ("/v1/keysync/imports/i1/rejections?after_row={}", "operator"),
        ("/v1/tokens/{}", "admin"),
        ("/v1/audit?after_seq={}", "admin"),
        ("/v1/se/flags/{}", "operator"),
        ("/v1/se/flags?after={}", "operator"),
    ],
)
def test_an_integer_past_the_columns_range_is_a_422_not_a_500(
    client: TestClient, tokens: dict[str, str], url: str, role: str
) -> None:
    # found by schemathesis: 2**64 overflowed SQLite, and 2**31 PostgreSQL's integer columns
    for value in (MAX_INTEGER + 1, 2**63, 2**64):
        response = client.get(url.format(value), headers=bearer(tokens[role]))
        assert_problem(response, 422, "invalid-request")
    response = client.get(url.format(MAX_INTEGER), headers=bearer(tokens[role]))
    assert response.status_code in (200, 404), response.text


@pytest.mark.parametrize("value", ["0.5", "1767225600", "2026-01-01", "yesterday"])
def test_audit_times_are_rfc3339_as_documented(
    client: TestClient, tokens: dict[str, str], value: str
) -> None:
    # pydantic alone reads a number as seconds since the epoch; the document says date-time
    response = client.get("/v1/audit", params={"until": value}, headers=bearer(tokens["admin"]))
    assert_problem(response, 422, "invalid-request")


def test_audit_times_take_rfc3339(client: TestClient, tokens: dict[str, str]) -> None:
    for value in ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+08:00", "2026-01-01 00:00:00Z"]:
        response = client.get("/v1/audit", params={"since": value}, headers=bearer(tokens["admin"]))
        assert response.status_code == 200, (value, response.text)


@pytest.mark.parametrize(
    ("url", "parameter", "role"),
    [
        ("/v1/tokens", "name", "admin"),
        ("/v1/audit", "actor", "admin"),
        ("/v1/se/elements", "device", "operator"),
        ("/v1/outbox/messages", "destination", "operator"),
    ],
)
def test_a_nul_character_is_refused_input_not_a_500(
    client: TestClient, db: Database, tokens: dict[str, str], url: str, parameter: str, role: str
) -> None:
    # PostgreSQL can neither store nor compare text with NUL; psycopg refused to send it
    response = client.get(url, params={parameter: "a\x00b"}, headers=bearer(tokens[role]))
    if db.engine.dialect.name == "postgresql":
        assert_problem(response, 400, "nul-in-text")
    else:  # SQLite compares it like any other character: nothing matches
        assert response.status_code in (200, 404), response.text
