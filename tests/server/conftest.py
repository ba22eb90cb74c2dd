"""Fixtures for the server spine: an app over a migrated database with a soft key store
under a fresh master key, plus a stand-in key store that can be made unreachable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from trustfleet.errors import KeyStoreError
from trustfleet.keystore.base import KeyInfo, KeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.server.app import create_app
from trustfleet.server.auth import create_token, revoke_token
from trustfleet.server.context import AppContext
from trustfleet.server.models import ROLES
from trustfleet.settings import Settings
from trustfleet.store import Database

MAX_BODY_BYTES = 4096


class StubKeyStore(KeyStore):
    """Answers ``list()`` (what readiness asks); ``reachable = False`` makes it fail."""

    backend = "stub"

    def __init__(self) -> None:
        self.reachable = True

    def list(self) -> list[KeyInfo]:
        if not self.reachable:
            raise KeyStoreError("token not present")
        return []

    def _unused(self, *_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError

    generate = import_key = info = public_key = sign = decrypt = encrypt = _unused
    wrap = unwrap = derive = mac = export = destroy = _unused


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, max_body_bytes=MAX_BODY_BYTES, max_import_bytes=65536)


@pytest.fixture
def keystore(db: Database) -> KeyStore:
    return SoftKeyStore(db, MasterKeyring([MasterKey.new()]))


@pytest.fixture
def context(settings: Settings, db: Database, keystore: KeyStore) -> AppContext:
    return AppContext(settings=settings, db=db, keystore=keystore)


@pytest.fixture
def app(context: AppContext) -> FastAPI:
    return create_app(context)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tokens(db: Database) -> dict[str, str]:
    """One live token per role, by role."""
    return {role: create_token(db, f"test {role}", role)[0] for role in sorted(ROLES)}


@pytest.fixture
def revoked_admin_token(db: Database, tokens: dict[str, str]) -> str:
    """A revoked admin token (beside ``tokens``' live one: the last live admin token cannot
    be revoked)."""
    plaintext, info = create_token(db, "revoked admin", "admin")
    revoke_token(db, info.id)
    return plaintext


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status`` (and ``code``); returns it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str)
    assert body["type"] == f"urn:trustfleet:problem:{body['code']}"
    if code is not None:
        assert body["code"] == code, body
    return body
