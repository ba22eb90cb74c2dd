"""Service registration over the operator API."""

from __future__ import annotations

from fastapi.testclient import TestClient

from .conftest import auth, ok, problem


def test_register_idempotently_and_bind_a_terminal(
    client: TestClient, tokens: dict[str, str]
) -> None:
    operator = auth(tokens["operator"])
    body = {"mdn": "+86 138 0013 8000", "application_ids": ["a", "b"]}
    first = ok(client.post("/v1/keysync/registrations", headers=operator, json=body))
    assert first == {"mdn": "+8613800138000", "terminal_id": None,
                     "application_ids": ["a", "b"], "bindings": []}  # fmt: skip
    again = ok(client.post("/v1/keysync/registrations", headers=operator, json=body))
    assert again == first
    bound = ok(
        client.post(
            "/v1/keysync/registrations",
            headers=operator,
            json={"mdn": "+8613800138000", "application_ids": ["c"], "terminal_id": "T-1"},
        )
    )
    assert bound["terminal_id"] == "T-1" and bound["application_ids"] == ["a", "b", "c"]
    problem(
        client.post(
            "/v1/keysync/registrations",
            headers=operator,
            json={"mdn": "+8613900139000", "application_ids": ["a"], "terminal_id": "T-1"},
        ),
        409,
        "keysync-registration-conflict",
    )
    left = ok(
        client.delete("/v1/keysync/registrations/8613800138000?application_id=a", headers=operator)
    )
    assert left["application_ids"] == ["b", "c"]
    cleared = ok(client.delete("/v1/keysync/registrations/8613800138000", headers=operator))
    assert cleared["application_ids"] == [] and cleared["terminal_id"] is None


def test_only_acceptable_numbers_register(client: TestClient, tokens: dict[str, str]) -> None:
    operator = auth(tokens["operator"])
    for mdn in ("12345", "+86123", "+8614400000001"):
        answer = client.post(
            "/v1/keysync/registrations",
            headers=operator,
            json={"mdn": mdn, "application_ids": ["a"]},
        )
        problem(answer, 400, "keysync-invalid-mdn")
    iot = {"mdn": "+861440000000001", "application_ids": ["a"]}
    ok(client.post("/v1/keysync/registrations", headers=operator, json=iot))
    manufacturer = auth(tokens["manufacturer"])
    assert (
        client.post("/v1/keysync/registrations", headers=manufacturer, json=iot).status_code == 403
    )
