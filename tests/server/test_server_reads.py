"""What operators read through the spine: whoami, tokens by name and id, the key store's
status, the auditor role (reads, never changes), the local principal of the CLI's
in-process calls, and the offline API documentation."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext
from trustfleet.server.docs import ASSET_FILES, ASSETS_URL, assets_directory
from trustfleet.server.local import in_process
from trustfleet.store import Database, audit

from .conftest import assert_problem, bearer
from .helpers import protected_calls


def test_whoami_names_the_token(client: TestClient, tokens: dict[str, str]) -> None:
    for role, token in tokens.items():
        me = client.get("/v1/whoami", headers=bearer(token)).json()
        assert (me["name"], me["role"], me["local"]) == (f"test {role}", role, False)
        assert me["actor"] == f"token:{me['token_id']}:test {role}"
        assert me["expires_at"] is None
    assert_problem(client.get("/v1/whoami"), 401, "authentication-required")


def test_tokens_have_a_ttl_a_unique_name_and_are_shown_by_name(
    client: TestClient, tokens: dict[str, str]
) -> None:
    admin = bearer(tokens["admin"])
    made = client.post(
        "/v1/tokens", json={"name": "tms", "role": "operator", "ttl_seconds": 3600}, headers=admin
    )
    assert made.status_code == 201, made.text
    created = made.json()
    assert created["expires_at"] is not None and created["active"] is True
    again = client.post("/v1/tokens", json={"name": "tms", "role": "admin"}, headers=admin)
    assert_problem(again, 409, "token-name-taken")
    (by_name,) = client.get("/v1/tokens", params={"name": "tms"}, headers=admin).json()
    by_id = client.get(f"/v1/tokens/{created['id']}", headers=admin).json()
    assert by_name == by_id and by_id["name"] == "tms" and "token" not in by_id
    missing = client.get("/v1/tokens", params={"name": "nobody"}, headers=admin)
    assert_problem(missing, 404, "token-not-found")
    too_short = {"name": "x", "role": "operator", "ttl_seconds": 10}
    assert_problem(client.post("/v1/tokens", json=too_short, headers=admin), 422)
    me = client.get("/v1/whoami", headers=bearer(created["token"])).json()
    assert me["expires_at"] == created["expires_at"]


def test_the_auditor_reads_and_changes_nothing(app: FastAPI, tokens: dict[str, str]) -> None:
    reads = {
        (method, url)
        for method, url, admitted in protected_calls(app)
        if "auditor" in admitted and method == "GET"
    }
    assert {
        ("GET", "/v1/audit"),
        ("GET", "/v1/audit/verify"),
        ("GET", "/v1/tokens"),
        ("GET", "/v1/ca"),
        ("GET", "/v1/keystore"),
        ("GET", "/v1/keystore/keys"),
        ("GET", "/v1/tmk/terminals"),
        ("GET", "/v1/whoami"),
    } <= reads
    writes = [
        (method, url)
        for method, url, admitted in protected_calls(app)
        if "auditor" in admitted and method != "GET"
    ]
    assert writes == []


def test_keystore_status_and_keys(client: TestClient, tokens: dict[str, str]) -> None:
    auditor = bearer(tokens["auditor"])
    status = client.get("/v1/keystore", headers=auditor).json()
    assert status == {"backend": "soft", "reachable": True, "keys": 0, "problem": None}
    assert client.get("/v1/keystore/keys", headers=auditor).json() == {
        "backend": "soft",
        "keys": [],
    }
    assert_problem(client.get("/v1/keystore", headers=bearer(tokens["operator"])), 403)


def test_in_process_calls_are_the_local_principal(context: AppContext, db: Database) -> None:
    with TestClient(in_process(create_app(context))) as local:
        me = local.get("/v1/whoami").json()
        assert me == {
            "name": "cli",
            "role": "local",
            "actor": "cli",
            "token_id": None,
            "expires_at": None,
            "local": True,
        }
        created = local.post("/v1/tokens", json={"name": "made locally", "role": "auditor"})
        assert created.status_code == 201
    with db.reading() as reads:
        last = list(audit.all_records(reads))[-1]
    assert (last.action, last.actor) == ("token.created", "cli")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"trustfleet.local_principal": "1"},
        {"X-Trustfleet-Local-Principal": "true"},
        {"Authorization": "Local cli"},
    ],
)
def test_no_network_request_is_the_local_principal(
    client: TestClient, headers: dict[str, str]
) -> None:
    assert_problem(client.get("/v1/whoami", headers=headers), 401, "authentication-required")
    refused = client.post("/v1/tokens", json={"name": "x", "role": "admin"}, headers=headers)
    assert_problem(refused, 401)


def test_docs_load_their_assets_from_this_server(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert sources and all(url.startswith(ASSETS_URL) for url in sources), sources
    assert "cdn" not in page.text.lower()
    for name in ASSET_FILES:
        assert (assets_directory() / name).is_file()
        served = client.get(f"{ASSETS_URL}/{name}")
        assert served.status_code == 200 and len(served.content) > 1000, name
    redoc = client.get("/redoc")
    assert f"{ASSETS_URL}/redoc.standalone.js" in redoc.text
    assert "fonts.googleapis" not in redoc.text
    assert client.get("/openapi.json").json()["paths"]["/v1/whoami"]


def test_listing_pages_are_documented_with_stable_names(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for page in ("AuditPage", "TerminalPage"):
        assert set(schemas[page]["properties"]) == {"items", "next_cursor"}
