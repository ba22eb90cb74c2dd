"""The fleet view over HTTP: hosts report through the device gateway with the reference
reporter, operators see the theft flag and acknowledge it; reports need the
device-gateway role (every other role, and no token, is refused with problem+json and
records nothing), both through the device lane and through FastAPI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.binding.api import READ_ROLES
from trustfleet.binding.errors import SeBoundElsewhere
from trustfleet.binding.reporting import REPORT_PATH, HttpReporter
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.server.app import create_app
from trustfleet.server.auth import create_token, revoke_token
from trustfleet.server.context import AppContext
from trustfleet.server.models import ROLES
from trustfleet.settings import Settings
from trustfleet.store import Database
from trustfleet.store.audit import iter_records

from .conftest import HostFactory, make_se, report_body

SE = "00112233445566778899aabbccddeeff"


@pytest.fixture
def context(tmp_path: Path, db: Database) -> AppContext:
    keystore = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
    return AppContext(settings=Settings(data_dir=tmp_path), db=db, keystore=keystore)


@pytest.fixture(params=[True, False], ids=["device-lane", "fastapi"])
def client(context: AppContext, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    app = create_app(context, device_lane=request.param)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tokens(db: Database) -> dict[str, str]:
    return {role: create_token(db, f"test {role}", role)[0] for role in sorted(ROLES)}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def post_report(client: TestClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post(
        REPORT_PATH, content=body, headers={**headers, "Content-Type": "application/json"}
    )


def get(client: TestClient, token: str, path: str, **params: Any) -> Any:
    response = client.get(path, headers=auth(token), params=params)
    assert response.status_code == 200, response.text
    return response.json()


# =====================================================================================
# Who may report
# =====================================================================================


def test_reports_need_the_device_gateway_role_and_refuse_everyone_else(
    client: TestClient, tokens: dict[str, str], db: Database, sessions: sessionmaker[Session]
) -> None:
    body = report_body("failed", "gw-b", SE)
    refused = 0
    for role, token in tokens.items():
        if role == "device-gateway":
            continue
        problem(post_report(client, body, auth(token)), 403, "forbidden")
        refused += 1
    revoked = create_token(db, "old gateway", "device-gateway")
    revoke_token(db, revoked[1].id)
    for headers in (
        {},
        {"Authorization": "Basic Z3c6Z3c="},
        auth("tf_" + "A" * 43),
        auth(revoked[0]),
    ):
        answer = post_report(client, body, headers)
        problem(answer, 401, "authentication-required")
        assert answer.headers["www-authenticate"] == "Bearer"
    assert refused == len(ROLES) - 1 >= 5
    assert get(client, tokens["operator"], "/v1/se/elements")["elements"] == []
    with sessions() as session:
        actions = [r.action for r in iter_records(session)]
    assert actions.count("auth.forbidden") == refused
    assert "se.reported" not in actions

    accepted = post_report(client, body, auth(tokens["device-gateway"]))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "recorded"
    assert set(accepted.json()) == {"status", "report_id"}  # nothing about flags


def test_the_fleet_view_is_for_operators_and_acknowledging_for_operators_only(
    client: TestClient, tokens: dict[str, str]
) -> None:
    post_report(client, report_body("failed", "gw-b", SE), auth(tokens["device-gateway"]))
    (flag,) = get(client, tokens["operator"], "/v1/se/flags")["flags"]
    reads = ["/v1/se/elements", f"/v1/se/elements/{SE}", f"/v1/se/elements/{SE}/events"]
    reads += ["/v1/se/flags", f"/v1/se/flags/{flag['id']}"]
    ack = f"/v1/se/flags/{flag['id']}/acknowledge"
    for role, token in tokens.items():
        for path in reads:
            answer = client.get(path, headers=auth(token))
            if role in READ_ROLES:
                assert answer.status_code == 200, (role, path, answer.text)
            else:
                problem(answer, 403, "forbidden")
        if role != "operator":
            problem(client.post(ack, headers=auth(token), json={}), 403, "forbidden")
    assert client.post(ack, headers=auth(tokens["operator"]), json={}).status_code == 200


# =====================================================================================
# The flow: the reference host and its HTTP reporter, then the operator
# =====================================================================================


def test_a_stolen_se_is_flagged_over_http_and_the_operator_acknowledges_it(
    client: TestClient, tokens: dict[str, str], make_host: HostFactory
) -> None:
    reporter = HttpReporter(client, tokens["device-gateway"])
    se = make_se()
    se_id = se.se_id.hex()
    owner = make_host(se, device_id="gateway-1", reporter=reporter)
    for _ in range(5):
        owner.power_up()
    operator = tokens["operator"]
    assert get(client, operator, "/v1/se/flags", status="all")["flags"] == []

    thief = make_host(se, device_id="gateway-2", reporter=reporter)
    for _ in range(2):
        with pytest.raises(SeBoundElsewhere):
            thief.power_up()
    assert reporter.pending == 0

    (flag,) = get(client, operator, "/v1/se/flags")["flags"]
    assert flag["rule"] == "foreign-failure" and flag["count"] == 2
    assert (flag["se_id"], flag["device_id"], flag["bound_device"]) == (
        se_id,
        "gateway-2",
        "gateway-1",
    )
    flagged = get(client, operator, "/v1/se/elements", flagged="true")["elements"]
    assert [(e["se_id"], e["bound_device"], e["open_flags"]) for e in flagged] == [
        (se_id, "gateway-1", 1)
    ]
    events = get(client, operator, f"/v1/se/elements/{se_id}/events", limit=3)
    assert [e["kind"] for e in events["events"]] == ["failed", "failed", "verified"]
    assert events["next_before"] == events["events"][-1]["id"]
    assert get(client, operator, "/v1/se/flags", device="gateway-2")["flags"] == [flag]
    assert get(client, operator, "/v1/se/flags", se_id="f" * 32)["flags"] == []

    ack = f"/v1/se/flags/{flag['id']}/acknowledge"
    done = client.post(ack, headers=auth(operator), json={"note": "swapped by the installer"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "acknowledged"
    assert done.json()["note"] == "swapped by the installer"
    problem(client.post(ack, headers=auth(operator)), 409, "se-flag-already-acknowledged")
    assert get(client, operator, "/v1/se/flags")["flags"] == []
    acknowledged = get(client, operator, "/v1/se/flags", status="acknowledged")["flags"]
    assert [f["id"] for f in acknowledged] == [flag["id"]]


def test_refusals_are_problems_with_their_codes(client: TestClient, tokens: dict[str, str]) -> None:
    gateway, operator = auth(tokens["device-gateway"]), auth(tokens["operator"])
    problem(post_report(client, b'{"type":"x"}', gateway), 400, "se-malformed-message")
    problem(post_report(client, b"\xff" * 10, gateway), 400, "se-malformed-message")
    body = report_body("bound", "gw-a", SE, report_id="a" * 32)
    assert post_report(client, body, gateway).json()["status"] == "recorded"
    assert post_report(client, body, gateway).json()["status"] == "duplicate"
    reused = report_body("bound", "gw-z", SE, report_id="a" * 32)
    problem(post_report(client, reused, gateway), 409, "se-report-id-reused")
    problem(client.get(f"/v1/se/elements/{'e' * 32}", headers=operator), 404, "se-unknown-element")
    problem(client.get("/v1/se/flags/77", headers=operator), 404, "se-unknown-flag")
    problem(client.post("/v1/se/flags/77/acknowledge", headers=operator), 404, "se-unknown-flag")
    problem(client.get("/v1/se/elements/NOT-HEX", headers=operator), 422, "invalid-request")
    problem(client.get("/v1/se/flags?status=closed", headers=operator), 422, "invalid-request")
    problem(client.get("/v1/se/flags?rule=other", headers=operator), 422, "invalid-request")
    too_long = client.post("/v1/se/flags/1/acknowledge", headers=operator, json={"note": "n" * 501})
    problem(too_long, 422, "invalid-request")


def test_a_queue_refused_for_its_token_is_delivered_later_with_the_right_one(
    client: TestClient,
    tokens: dict[str, str],
    make_host: HostFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host configured with a token of the wrong role: its reports wait in the queue file
    (a 403 may be fixed by a new token; the power-up is not affected); the next process,
    with a gateway token, delivers them in order."""
    queue = tmp_path / "reports.queue"
    wrong = HttpReporter(client, tokens["operator"], queue_file=queue)
    se = make_se()
    host = make_host(se, device_id="gw", reporter=wrong)
    with caplog.at_level(logging.WARNING, logger="trustfleet.binding.reporting"):
        assert host.power_up().bound_now
        wrong.close()
    assert wrong.pending == 3 and len(queue.read_bytes().splitlines()) == 3
    assert "403 [forbidden]" in caplog.text
    operator = tokens["operator"]
    assert get(client, operator, "/v1/se/elements")["elements"] == []

    right = HttpReporter(client, tokens["device-gateway"], queue_file=queue)
    assert right.pending == 3
    assert right.flush() == 0
    assert not queue.exists()
    (element,) = get(client, operator, "/v1/se/elements")["elements"]
    assert (element["bound_device"], element["locked"], element["last_kind"]) == (
        "gw",
        True,
        "locked",
    )
