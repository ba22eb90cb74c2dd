"""/metrics: Prometheus text with request counts, latency and audit records, labelled by
route template (never the raw path)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext

from .conftest import bearer


def _samples(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def _value(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for found, v in samples if all(found.get(k) == x for k, x in labels.items()))


def test_requests_are_counted_by_route_template_and_status(
    client: TestClient, tokens: dict[str, str]
) -> None:
    admin = bearer(tokens["admin"])
    client.get("/healthz")
    client.get("/healthz")
    client.delete("/v1/tokens/424242", headers=admin)
    client.delete("/v1/tokens/434343", headers=admin)
    client.get("/no/such/path/123")
    samples = _samples(client)
    requests = samples["trustfleet_http_requests_total"]
    assert _value(requests, route="/healthz", method="GET", status="200") == 2
    assert _value(requests, route="/v1/tokens/{token_id}", method="DELETE", status="404") == 2
    assert _value(requests, route="unmatched", status="404") == 1
    labels = {found["route"] for found, _ in requests}
    assert not any("424242" in label or "no/such" in label for label in labels)
    latency = samples["trustfleet_http_request_duration_seconds_count"]
    assert _value(latency, route="/healthz", status="200") == 2


def test_audit_records_written_are_counted(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])
    before = _samples(client).get("trustfleet_audit_records_written_total", [])
    client.post("/v1/tokens", headers=admin, json={"name": "a", "role": "platform"})
    client.get("/v1/tokens", headers=bearer("tf_wrong"))
    after = _samples(client)["trustfleet_audit_records_written_total"]
    assert _value(after) == _value(before) + 2
    created = _value(after, action="token.created") - _value(before, action="token.created")
    assert created == 1
    assert _value(after, action="auth.failed", outcome="failure") == 1


def test_rolled_back_audit_records_are_not_counted(client: TestClient) -> None:
    # a refused create (unknown role) writes nothing, so counts nothing
    client.post("/v1/tokens", json={"name": "a", "role": "nobody"})
    audit = _samples(client).get("trustfleet_audit_records_written_total", [])
    assert _value(audit, action="token.created") == 0


def test_each_app_has_its_own_registry(context: AppContext, app: FastAPI) -> None:
    other = create_app(context)
    with TestClient(app) as first, TestClient(other) as second:
        first.get("/healthz")
        first.get("/healthz")
        second.get("/healthz")
        assert _value(_samples(second)["trustfleet_http_requests_total"], route="/healthz") == 1
        assert _value(_samples(first)["trustfleet_http_requests_total"], route="/healthz") == 2


def test_unknown_methods_do_not_grow_the_label_set(client: TestClient) -> None:
    client.request("BREW", "/healthz")
    methods = {found["method"] for found, _ in _samples(client)["trustfleet_http_requests_total"]}
    assert "BREW" not in methods
