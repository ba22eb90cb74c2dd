"""PKI fixtures: a service over the migrated database and the soft key store (CA keys
wrapped under a fresh master key), and a small CA hierarchy (root -> issuing)."""

from __future__ import annotations

import pytest

from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.pki.service import PkiService
from trustfleet.store import Database

from .helpers import Hierarchy


@pytest.fixture
def keystore(db: Database) -> SoftKeyStore:
    return SoftKeyStore(db, MasterKeyring([MasterKey.new()]))


@pytest.fixture
def pki(db: Database, keystore: SoftKeyStore) -> PkiService:
    return PkiService(db, keystore)


@pytest.fixture
def hierarchy(pki: PkiService) -> Hierarchy:
    root = pki.create_root_ca("root")
    return Hierarchy(root, pki.create_intermediate_ca("issuing", "root"))
