"""The spine's routes, and the rule that every route says who may call it."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, require_role
from trustfleet.store import Database, audit
from trustfleet.store.engine import make_engine

from .conftest import StubKeyStore, assert_problem, bearer
from .helpers import api_routes, is_public, protected_calls, role_requirements

PUBLIC_SPINE_PATHS = {"/healthz", "/readyz", "/metrics"}


def _audit(sessions: sessionmaker[Session]) -> list[audit.AuditRecord]:
    with sessions() as session:
        return list(audit.iter_records(session))


# --- every route is guarded -------------------------------------------------------------


def test_every_route_declares_roles_or_public(app: FastAPI) -> None:
    undeclared = [
        route.path
        for route in api_routes(app)
        if not role_requirements(route) and not is_public(route)
    ]
    assert undeclared == []


def test_spine_public_routes_are_only_health_and_metrics(app: FastAPI) -> None:
    spine_public = {
        r.path for r in api_routes(app) if is_public(r) and not r.path.startswith("/v1/")
    }
    assert spine_public >= PUBLIC_SPINE_PATHS
    assert not any(
        is_public(r) for r in api_routes(app) if r.path.startswith(("/v1/tokens", "/v1/audit"))
    )


def test_every_guarded_route_refuses_missing_bad_and_revoked_tokens(
    app: FastAPI, client: TestClient, revoked_admin_token: str, tokens: dict[str, str]
) -> None:
    credentials = {
        "no header": {},
        "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage": bearer("garbage"),
        "unknown token": bearer("tf_" + "A" * 43),
        "revoked": bearer(revoked_admin_token),
    }
    calls = protected_calls(app)
    assert len(calls) >= 5
    for method, url, _ in calls:
        for what, headers in credentials.items():
            response = client.request(method, url, headers=headers, json={})
            body = assert_problem(response, 401, "authentication-required")
            assert response.headers["www-authenticate"] == "Bearer", (method, url, what)
            assert "tf_" not in response.text
            assert body["detail"] == "A valid API token is required"  # no reason leaked


def test_every_guarded_route_admits_exactly_its_roles(
    app: FastAPI, client: TestClient, tokens: dict[str, str]
) -> None:
    for method, url, admitted in protected_calls(app):
        for role, token in tokens.items():
            response = client.request(method, url, headers=bearer(token), json={})
            if role in admitted:
                assert response.status_code not in (401, 403), (method, url, role, response.text)
            else:
                assert_problem(response, 403, "forbidden")


def test_admin_is_not_a_superuser(context: AppContext, tokens: dict[str, str]) -> None:
    router = APIRouter()

    @router.get("/v1/test/operators-only")
    def operators_only(
        principal: Annotated[Principal, Depends(require_role("operator"))],
    ) -> dict[str, str]:
        return {"role": principal.role}

    app = create_app(context)
    app.include_router(router)
    with TestClient(app) as client:
        assert_problem(client.get("/v1/test/operators-only", headers=bearer(tokens["admin"])), 403)
        ok = client.get("/v1/test/operators-only", headers=bearer(tokens["operator"]))
        assert ok.json() == {"role": "operator"}


def test_require_role_refuses_unknown_roles() -> None:
    with pytest.raises(ValueError):
        require_role("superuser")
    with pytest.raises(ValueError):
        require_role()


# --- audit of refused requests ----------------------------------------------------------


def test_authentication_failure_writes_one_audit_record_without_the_token(
    client: TestClient, sessions: sessionmaker[Session], engine: Engine
) -> None:
    presented = "tf_" + "Q" * 43
    before = len(_audit(sessions))
    assert_problem(client.get("/v1/tokens", headers=bearer(presented)), 401)
    records = _audit(sessions)[before:]
    assert [(r.action, r.outcome) for r in records] == [("auth.failed", "failure")]
    assert records[0].subject == "GET /v1/tokens"
    assert '"reason":"unknown"' in records[0].details
    with engine.connect() as connection:
        dump = str(list(connection.execute(text("SELECT * FROM audit_log"))))
    assert "Q" * 20 not in dump


def test_a_route_with_two_role_checks_still_audits_once(
    context: AppContext, sessions: sessionmaker[Session]
) -> None:
    router = APIRouter()

    @router.get(
        "/v1/test/double",
        dependencies=[Depends(require_role("operator")), Depends(require_role("platform"))],
    )
    def double() -> None:
        return None

    app = create_app(context)
    app.include_router(router)
    with TestClient(app) as client:
        before = len(_audit(sessions))
        client.get("/v1/test/double", headers=bearer("tf_nope"))
        assert len(_audit(sessions)) == before + 1


def test_forbidden_request_is_audited_with_the_caller(
    client: TestClient, sessions: sessionmaker[Session], tokens: dict[str, str]
) -> None:
    before = len(_audit(sessions))
    assert_problem(client.get("/v1/audit", headers=bearer(tokens["operator"])), 403, "forbidden")
    records = _audit(sessions)[before:]
    assert [r.action for r in records] == ["auth.forbidden"]
    assert records[0].actor.endswith(":test operator")


def test_auth_failure_with_hostile_path_is_audited_not_500(client: TestClient) -> None:
    response = client.delete("/v1/tokens/%00" + "x" * 3000, headers=bearer("tf_bad"))
    assert response.status_code in (401, 404, 422)


# --- health -----------------------------------------------------------------------------


def test_healthz_needs_nothing(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert len(response.headers["x-request-id"]) >= 8


def test_readyz_checks_database_and_keystore(client: TestClient, context: AppContext) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}
    stub = StubKeyStore()
    app = create_app(replace(context, keystore=stub))
    with TestClient(app, raise_server_exceptions=False) as stub_client:
        assert stub_client.get("/readyz").status_code == 200
        stub.reachable = False
        body = assert_problem(stub_client.get("/readyz"), 503, "not-ready")
        assert "key store" in body["detail"]
        assert stub_client.get("/healthz").status_code == 200  # alive, just not ready


def test_readyz_fails_when_the_database_is_gone(context: AppContext, tmp_path: object) -> None:
    broken = make_engine("sqlite:////nonexistent-dir/trustfleet.db")
    app = create_app(
        AppContext(settings=context.settings, db=Database(broken), keystore=context.keystore)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
        assert "database" in body["detail"]


def test_request_id_is_echoed_when_plain_and_replaced_when_not(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == (
        "abc-123"
    )
    hostile = client.get("/healthz", headers={"X-Request-ID": 'a b"<script>' + "x" * 100})
    assert hostile.headers["x-request-id"] != "a b"
    assert "<" not in hostile.headers["x-request-id"]


# --- tokens -----------------------------------------------------------------------------


def test_token_lifecycle_over_http(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])
    created = client.post("/v1/tokens", headers=admin, json={"name": "tms-1", "role": "operator"})
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    new = created.json()
    assert new["role"] == "operator" and new["token"].startswith("tf_")
    assert new["revoked_at"] is None

    listed = client.get("/v1/tokens", headers=admin)
    assert listed.status_code == 200
    assert new["token"] not in listed.text
    assert "token_hash" not in listed.text
    assert {"tms-1", "test operator"} <= {t["name"] for t in listed.json()}

    # the new operator token works, but not on admin routes
    assert_problem(client.get("/v1/tokens", headers=bearer(new["token"])), 403)

    revoked = client.delete(f"/v1/tokens/{new['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert_problem(client.get("/v1/tokens", headers=bearer(new["token"])), 401)


def test_revoking_an_unknown_token_is_404(client: TestClient, tokens: dict[str, str]) -> None:
    assert_problem(
        client.delete("/v1/tokens/424242", headers=bearer(tokens["admin"])), 404, "token-not-found"
    )


@pytest.mark.parametrize("token_id", ["0", "-5", "abc", "99999999999999999999999", "1.5"])
def test_revoke_with_bad_id_is_422(
    client: TestClient, tokens: dict[str, str], token_id: str
) -> None:
    assert_problem(
        client.delete(f"/v1/tokens/{token_id}", headers=bearer(tokens["admin"])),
        422,
        "invalid-request",
    )


# --- audit ------------------------------------------------------------------------------


def test_audit_pages_follow_the_cursor(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])  # the fixture wrote one token.created per role
    first = client.get("/v1/audit", params={"limit": 4}, headers=admin).json()
    assert [r["seq"] for r in first["items"]] == [1, 2, 3, 4]
    assert first["items"][0]["action"] == "token.created"
    assert first["items"][0]["details"]["role"] == "admin"
    assert first["items"][0]["at"].endswith(("Z", "+00:00"))
    cursor = first["next_cursor"]
    assert isinstance(cursor, str)
    rest = client.get("/v1/audit", params={"cursor": cursor, "limit": 1000}, headers=admin).json()
    assert rest["items"][0]["seq"] == 5
    assert rest["next_cursor"] is None
    after = client.get("/v1/audit", params={"after_seq": 6}, headers=admin).json()
    assert after["items"][0]["seq"] == 7
    assert_problem(client.get("/v1/audit", params={"limit": 0}, headers=admin), 422)
    assert_problem(client.get("/v1/audit", params={"after_seq": -1}, headers=admin), 422)
    for bad in ("garbage!", "eyJsIjoidG1rLXRlcm1pbmFscyIsImEiOiJQT1MifQ"):  # another listing's
        assert_problem(
            client.get("/v1/audit", params={"cursor": bad}, headers=admin), 400, "invalid-cursor"
        )


def test_audit_filters_by_action_actor_and_time(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])
    client.post("/v1/tokens", json={"name": "filtered", "role": "operator"}, headers=admin)
    client.get("/v1/tokens", headers=bearer(tokens["auditor"]))

    def actions(**params: str) -> list[str]:
        page = client.get("/v1/audit", params={"limit": 1000, **params}, headers=admin).json()
        return [r["action"] for r in page["items"]]

    assert set(actions(action="token.listed")) == {"token.listed"}
    assert set(actions(action="token.*")) == {"token.created", "token.listed"}
    assert actions(action="token") == []  # exact unless it ends in *
    by_admin = client.get(
        "/v1/audit", params={"actor": "token:1:test admin"}, headers=admin
    ).json()["items"]
    assert [(r["action"], r["details"].get("name")) for r in by_admin] == [
        ("token.created", "filtered")
    ]
    everything = client.get("/v1/audit", params={"limit": 1000}, headers=admin).json()["items"]
    middle = everything[3]["at"]
    assert [
        r["seq"]
        for r in client.get(
            "/v1/audit", params={"since": middle, "limit": 1000}, headers=admin
        ).json()["items"]
    ] == [r["seq"] for r in everything if r["at"] >= middle]
    assert [
        r["seq"]
        for r in client.get(
            "/v1/audit", params={"until": middle, "limit": 1000}, headers=admin
        ).json()["items"]
    ] == [r["seq"] for r in everything if r["at"] < middle]


def test_audit_verify_reports_tampering(
    client: TestClient, tokens: dict[str, str], engine: Engine
) -> None:
    admin = bearer(tokens["admin"])
    intact = client.get("/v1/audit/verify", headers=admin).json()
    assert intact["ok"] is True and intact["records"] >= 6 and intact["problems"] == []
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    tampered = client.get("/v1/audit/verify", headers=admin).json()
    assert tampered["ok"] is False
    assert tampered["problems"][0]["seq"] == 2


# --- documentation ----------------------------------------------------------------------


def test_openapi_documents_the_routes_and_the_bearer_scheme(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/tokens",
        "/v1/tokens/{token_id}",
        "/v1/audit",
    } <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["ApiToken"]["scheme"] == "bearer"
    assert client.get("/docs").status_code == 200


def test_route_templates_are_the_served_paths(app: FastAPI, client: TestClient) -> None:
    # metrics labels and the body limit rely on route templates being the full served paths
    spec = client.get("/openapi.json").json()
    assert {r.path for r in api_routes(app) if r.include_in_schema} == set(spec["paths"])
