"""Two real server processes on one PostgreSQL database behave as one service: a token
made on one node works on the other, a revocation on one is honoured by the other at once,
and both append to one valid audit chain (also when they write at the same time)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

pytestmark = [*needs_postgres, pytest.mark.slow]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema("mn_") as url:
        yield url


@pytest.fixture
def nodes(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    with running_nodes(node_environment(postgres_url, tmp_path), tmp_path) as (a, b):
        yield a, b


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_two_nodes_share_tokens_revocations_and_the_audit_chain(
    nodes: tuple[Node, Node], postgres_url: str
) -> None:
    a, b = nodes
    admin = _auth(admin_token_for(postgres_url))

    created = httpx.post(
        a.url + "/v1/tokens", headers=admin, json={"name": "made-on-a", "role": "admin"}
    )
    assert created.status_code == 201, created.text
    token, token_id = created.json()["token"], created.json()["id"]

    used_on_b = httpx.get(b.url + "/v1/tokens", headers=_auth(token))
    assert used_on_b.status_code == 200
    assert "made-on-a" in {t["name"] for t in used_on_b.json()}

    revoked_on_b = httpx.delete(f"{b.url}/v1/tokens/{token_id}", headers=admin)
    assert revoked_on_b.status_code == 200 and revoked_on_b.json()["revoked_at"]

    refused_on_a = httpx.get(a.url + "/v1/tokens", headers=_auth(token))
    assert refused_on_a.status_code == 401
    assert refused_on_a.headers["content-type"].startswith("application/problem+json")

    # both nodes append at the same time: the chain must stay one valid sequence
    def hammer(i: int) -> int:
        node = (a, b)[i % 2]
        return httpx.get(node.url + "/v1/tokens", headers=admin, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(hammer, range(24))) == {200}

    for node in (a, b):
        report = httpx.get(node.url + "/v1/audit/verify", headers=admin).json()
        assert (report["ok"], report["problems"], report["devices"]) == (True, [], [])
        assert report["records"] >= 1 + 1 + 1 + 1 + 1 + 24

    page = httpx.get(a.url + "/v1/audit", params={"limit": 1000}, headers=admin).json()
    actions = [(r["action"], r["actor"]) for r in page["items"]]
    assert actions[:5] == [
        ("token.created", "init"),
        ("token.created", "token:1:bootstrap admin"),  # on node a
        ("token.listed", f"token:{token_id}:made-on-a"),  # on node b, with a's token
        ("token.revoked", "token:1:bootstrap admin"),  # on node b
        ("auth.failed", "unauthenticated"),  # on node a, the revoked token
    ]
    assert [r["seq"] for r in page["items"]] == list(range(1, len(page["items"]) + 1))
