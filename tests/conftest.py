"""Shared fixtures: a migrated database on SQLite, and again on PostgreSQL when
``TRUSTFLEET_TEST_POSTGRES_URL`` is set (each test gets its own schema there); a SoftHSM2
token for the whole session, and the PKCS#11 key store on it (``hsm_store``).

The PKCS#11 tests must run wherever the suite runs: a missing SoftHSM2 is a failure that
says how to install it, never a skip."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from harness import (
    POSTGRES_URL,
    SoftHsmToken,
    init_softhsm_token,
    opencryptoki_token,
    postgres_schema,
)
from trustfleet.keystore.hsm import HsmKeyStore
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, make_session_factory, migrate

DATABASES = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database; the test is run once per available backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trustfleet.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def db(engine: Engine) -> Database:
    return Database(engine)


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SoftHsmToken, Path]]:
    """A fresh SoftHSM2 token in a temporary directory for the whole session, and its
    configuration file (``SOFTHSM2_CONF`` names it for the session)."""
    token, conf = init_softhsm_token(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield token, conf
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def softhsm_token(softhsm_conf: tuple[SoftHsmToken, Path]) -> SoftHsmToken:
    return softhsm_conf[0]


@pytest.fixture
def hsm_store(db: Database, softhsm_token: SoftHsmToken) -> Iterator[HsmKeyStore]:
    """The PKCS#11 backend as configured: signing keys in the token, the others sealed under
    its key encryption key in ``db``."""
    from trustfleet.keystore.hsm import HsmKeyStore

    store = HsmKeyStore(db, softhsm_token.module, softhsm_token.label, softhsm_token.user_pin)
    yield store
    store.close()


@pytest.fixture(scope="session")
def opencryptoki() -> Iterator[SoftHsmToken]:
    """openCryptoki's software token, the second PKCS#11 implementation the key store is
    tested on (set up by :func:`harness.opencryptoki_token`, which skips saying why when it
    cannot be)."""
    with opencryptoki_token() as token:
        yield token


@pytest.fixture
def ock_store(db: Database, opencryptoki: SoftHsmToken) -> Iterator[HsmKeyStore]:
    """The PKCS#11 backend as configured, on openCryptoki's software token."""
    from trustfleet.keystore.hsm import HsmKeyStore

    store = HsmKeyStore(db, opencryptoki.module, opencryptoki.label, opencryptoki.user_pin)
    yield store
    store.close()
