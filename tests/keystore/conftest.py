"""Key store fixtures: a SoftHSM2 token for the whole session, and ``keystore``, one store per
backend (the soft store once per test database).

The PKCS#11 tests must run wherever the suite runs: a missing SoftHSM2 is a failure that
says how to install it, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustfleet.keystore.base import KeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database

MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
INSTALL_HINT = (
    "run the README test command `scripts/dev test` (or `scripts/dev pytest`), which installs"
    " the Debian package softhsm2"
)
TOKEN_LABEL = "trustfleet-test"
USER_PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    user_pin: str


def find_softhsm_module() -> str:
    candidates = [os.environ.get("SOFTHSM2_MODULE", ""), *MODULE_PATHS]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(
        f"the SoftHSM2 PKCS#11 module was not found (set SOFTHSM2_MODULE or {INSTALL_HINT})"
    )


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A fresh SoftHSM2 token in a temporary directory, for the whole test session."""
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail(f"softhsm2-util is not installed: {INSTALL_HINT}")
    module = find_softhsm_module()
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            USER_PIN,
            "--so-pin",
            SO_PIN,
        ],
        check=True,
        capture_output=True,
    )
    yield SoftHsmToken(module, TOKEN_LABEL, USER_PIN)
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


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
    return cases


@pytest.fixture
def keystore(request: pytest.FixtureRequest, backend_name: str, database_url: str) -> KeyStore:
    """The store under test; the database exists only for the soft backend."""
    if backend_name == "soft":
        store: KeyStore = request.getfixturevalue("soft_store")
        return store
    store = request.getfixturevalue("pkcs11_store")
    return store
