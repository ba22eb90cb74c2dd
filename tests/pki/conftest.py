"""PKI fixtures: a service over the migrated database and a key store, and a small CA
hierarchy (root -> issuing) built through it."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keystore.base import KeyStore
from trustfleet.pki.service import PkiService

from .helpers import Hierarchy
from .keystore_double import InMemoryKeyStore


@pytest.fixture
def keystore() -> KeyStore:
    return InMemoryKeyStore()


@pytest.fixture
def pki(sessions: sessionmaker[Session], keystore: KeyStore) -> PkiService:
    return PkiService(sessions, keystore)


@pytest.fixture
def hierarchy(pki: PkiService) -> Hierarchy:
    root = pki.create_root_ca("root")
    return Hierarchy(root, pki.create_intermediate_ca("issuing", "root"))
