"""Two real server processes on one PostgreSQL database take a fleet's reports as one
service: reports about one SE arriving at the same moment on both nodes raise each flag
once and count every report on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import (
    Node,
    admin_token_for,
    needs_postgres,
    node_environment,
    postgres_schema,
    running_nodes,
)
from trustfleet.binding.reporting import REPORT_PATH

from .conftest import report_body

pytestmark = [*needs_postgres, pytest.mark.slow]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema("se_") as url:
        yield url


@pytest.fixture
def nodes(postgres_url: str, tmp_path: Path) -> Iterator[list[Node]]:
    with running_nodes(node_environment(postgres_url, tmp_path), tmp_path) as started:
        yield started


def test_reports_arriving_together_on_two_nodes_raise_each_flag_once(
    nodes: list[Node], postgres_url: str
) -> None:
    admin = {"Authorization": f"Bearer {admin_token_for(postgres_url)}"}
    clients = [httpx.Client(base_url=node.url, timeout=60) for node in nodes]
    try:
        tokens = {
            role: clients[0]
            .post("/v1/tokens", json={"name": role, "role": role}, headers=admin)
            .json()["token"]
            for role in ("device-gateway", "operator")
        }
        gateway = {
            "Authorization": f"Bearer {tokens['device-gateway']}",
            "Content-Type": "application/json",
        }
        stolen, unknown = os.urandom(16).hex(), os.urandom(16).hex()
        for kind in ("bound", "verified", "locked"):
            body = report_body(kind, "gw-a", stolen)
            answer = clients[1].post(REPORT_PATH, content=body, headers=gateway)
            assert answer.status_code == 200, answer.text

        reports = 24
        barrier = threading.Barrier(8)

        def send(index: int) -> int:
            if index < 8:
                barrier.wait()
            se_id, device = (stolen, "gw-b") if index % 2 else (unknown, f"gw-{index % 4}")
            body = report_body("failed", device, se_id)
            response = clients[index % 2].post(REPORT_PATH, content=body, headers=gateway)
            return response.status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(send, range(reports)))
        assert statuses == [200] * reports

        operator = {"Authorization": f"Bearer {tokens['operator']}"}

        def flags(se_id: str) -> list[dict[str, Any]]:
            page = clients[0].get("/v1/se/flags", params={"se_id": se_id}, headers=operator)
            assert page.status_code == 200, page.text
            result: list[dict[str, Any]] = page.json()["flags"]
            return result

        (theft,) = flags(stolen)
        assert (theft["rule"], theft["count"], theft["bound_device"]) == (
            "foreign-failure",
            reports // 2,
            "gw-a",
        )
        per_host = sorted((f["rule"], f["device_id"], f["count"]) for f in flags(unknown))
        assert per_host == [("unknown-failure", "gw-0", 6), ("unknown-failure", "gw-2", 6)]
        element = clients[1].get(f"/v1/se/elements/{unknown}", headers=operator).json()
        assert element["open_flags"] == 2
        audit = clients[0].get("/v1/audit/verify", headers=admin).json()
        assert audit["ok"] is True
    finally:
        for client in clients:
            client.close()
