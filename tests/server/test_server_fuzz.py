"""Random junk at every route, with and without tokens of every role: the answer is never a
500, and every error is problem+json. Deterministic (seeded), so a failure reproduces."""

from __future__ import annotations

import json
import random
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from .conftest import MAX_BODY_BYTES
from .helpers import api_routes, fill_path, role_requirements

ROUNDS_PER_OPERATION = 30
PATH_JUNK = [
    "0",
    "-1",
    "999999",
    "9" * 40,
    "1.5",
    "abc",
    "%00",
    "%2e%2e",
    "x" * 300,
    "%C3%BC%E2%9C%93",
    "%20",
    "root",
    "issuing",
]
CONTENT_TYPES = [
    "application/json",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zzz",
    None,
]
STRINGS = ["", "admin", "operator", "x" * 5000, "\x00", "ü✓", "-1", "null", "tf_" + "A" * 43]


def _junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**70), 10**400 // 10**399, 1.5e308, 7])
    if kind == 3:
        return rng.choice(STRINGS)
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(20)))
    if kind in (5, 6):
        keys = ["name", "role", "subject", "csr_pem", "reason", "serial", "days", "names", "k"]
        return {rng.choice(keys): _junk_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _junk_body(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(200))
    if kind == 1:
        return b""
    if kind == 2:
        return json.dumps(_junk_value(rng)).encode()[:MAX_BODY_BYTES]
    if kind == 3:
        return json.dumps({"name": rng.choice(STRINGS), "role": rng.choice(STRINGS)}).encode()
    return rng.choice([b"{", b"[" * 3000, b'{"a":' * 500, b"\xff\xfe", b"nul\x00l", b"1e999999"])


def _junk_query(rng: random.Random) -> dict[str, str]:
    names = ["limit", "after_seq", "x", "name", "role"]
    return {rng.choice(names): rng.choice(["-5", "0", "1", "abc", "9" * 30, ""]) for _ in range(2)}


def test_junk_at_every_route_never_gets_a_500(
    app: FastAPI, client: TestClient, tokens: dict[str, str]
) -> None:
    rng = random.Random(20240509)
    credentials: list[str | None] = [None, "tf_junk", *tokens.values()]
    operations = [(m, r) for r in api_routes(app) for m in sorted(r.methods)]
    assert len(operations) >= 9
    for method, route in operations:
        for _ in range(ROUNDS_PER_OPERATION):
            admitted = [tokens[r] for q in role_requirements(route) for r in q.roles]
            # mostly a token the route admits, so the junk reaches the handler
            token = rng.choice(admitted if admitted and rng.random() < 0.7 else credentials)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            content_type = rng.choice(CONTENT_TYPES)
            if content_type:
                headers["Content-Type"] = content_type
            url = fill_path(route, rng.choice(PATH_JUNK))
            response = client.request(
                method, url, headers=headers, content=_junk_body(rng), params=_junk_query(rng)
            )
            where = f"{method} {url[:80]} -> {response.status_code}: {response.text[:300]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                assert response.headers["content-type"].startswith("application/problem+json"), (
                    where
                )
                assert isinstance(response.json()["code"], str), where


def test_junk_at_unknown_paths_and_methods(client: TestClient, tokens: dict[str, str]) -> None:
    rng = random.Random(7)
    for _ in range(60):
        method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
        path = "/" + "/".join(rng.choice([*PATH_JUNK, "v1", "tokens", "audit"]) for _ in range(3))
        response = client.request(
            method,
            path,
            headers={"Authorization": f"Bearer {tokens['admin']}"},
            content=_junk_body(rng),
        )
        assert 400 <= response.status_code < 500, (method, path, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
