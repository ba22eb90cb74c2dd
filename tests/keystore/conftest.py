"""Key store fixtures: ``keystore``, one store per backend (the soft store once per test
database; the PKCS#11 backend as configured, on the session's SoftHSM2 token from the root
conftest), and the token-object layer alone (``pkcs11_store``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness import SoftHsmToken
from trustfleet.keystore.base import KeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database


@pytest.fixture
def pkcs11_store(softhsm_token: SoftHsmToken) -> Iterator[KeyStore]:
    from trustfleet.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(softhsm_token.module, softhsm_token.label, softhsm_token.user_pin)
    yield store
    store.close()


@pytest.fixture
def master() -> MasterKeyring:
    return MasterKeyring([MasterKey.new()])


@pytest.fixture
def soft_store(db: Database, master: MasterKeyring) -> SoftKeyStore:
    return SoftKeyStore(db, master)


def backend_cases() -> list[object]:
    """(backend, database) pairs for ``keystore``: soft once per test database, PKCS#11 once.

    Use as ``pytestmark = pytest.mark.parametrize(("backend_name", "database_url"),
    backend_cases(), indirect=["database_url"])``: a parametrize mark takes precedence over
    the ``database_url`` fixture's own parameters.
    """
    cases = [pytest.param("soft", "sqlite", id="soft-sqlite")]
    if os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL"):
        cases.append(pytest.param("soft", "postgres", id="soft-postgres"))
    cases.append(pytest.param("pkcs11", "sqlite", id="pkcs11", marks=pytest.mark.pkcs11))
    cases.append(
        pytest.param("opencryptoki", "sqlite", id="opencryptoki", marks=pytest.mark.pkcs11)
    )
    return cases


@pytest.fixture
def keystore(request: pytest.FixtureRequest, backend_name: str, database_url: str) -> KeyStore:
    """The store under test: the soft store, or the PKCS#11 backend as ``open_keystore``
    makes it (keys in the token or sealed under it)."""
    if backend_name == "soft":
        store: KeyStore = request.getfixturevalue("soft_store")
        return store
    if backend_name == "opencryptoki":
        store = request.getfixturevalue("ock_store")
        return store
    store = request.getfixturevalue("hsm_store")
    return store
