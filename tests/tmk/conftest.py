"""What the TMK tests share: a movable clock, the capability's use cases over a real
database and a key store (every test runs once on the soft store and once on the PKCS#11
backend as configured, on SoftHSM2), terminals made at the factory and registered, the
service behind the terminal's transport without HTTP, and checks of what the database
holds."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from harness import SoftHsmToken
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import KeyNotFound, TrustfleetError
from trustfleet.keystore.base import KeyStore
from trustfleet.keystore.hsm import HsmKeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.pki.service import PkiService
from trustfleet.store import Database
from trustfleet.store.audit import AuditRecord, iter_records
from trustfleet.tmk import registry
from trustfleet.tmk.downloads import Activation, Downloads
from trustfleet.tmk.errors import TmkServerRefused
from trustfleet.tmk.identity import IdentityService
from trustfleet.tmk.models import DownloadSession, TerminalMasterKey
from trustfleet.tmk.protocol import (
    PROTOCOL_V1,
    PROTOCOL_V2,
    PROTOCOL_VERSION,
    Confirmation,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalSession,
)
from trustfleet.tmk.terminal import PosTerminal
from trustfleet.tmk.terminals import Terminals
from trustfleet.tmk.working_keys import WorkingKeys

PAN = "4111111111111111"


class Clock:
    """A clock the test moves; starts at the current second."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Tmk:
    """The TMK capability's use cases over one database and one key store."""

    db: Database
    sessions: sessionmaker[Session]
    keystore: KeyStore
    identity: IdentityService
    downloads: Downloads
    terminals: Terminals
    working_keys: WorkingKeys

    @classmethod
    def build(
        cls,
        db: Database,
        sessions: sessionmaker[Session],
        keystore: KeyStore,
        clock: Callable[[], datetime] | None = None,
    ) -> Tmk:
        timed: dict[str, Any] = {"clock": clock} if clock else {}
        identity = IdentityService(db, keystore, PkiService(db, keystore, **timed), **timed)
        return cls(
            db,
            sessions,
            keystore,
            identity,
            Downloads(db, keystore, identity, **timed),
            Terminals(db, keystore, **timed),
            WorkingKeys(db, keystore, **timed),
        )

    def register(self, record_pem: str, sn: str, model: str = "A920") -> None:
        registry.register_terminal(
            self.db, sn=sn, model=model, public_key=record_pem, actor="maker"
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


KEYSTORES = ["soft", pytest.param("pkcs11", marks=pytest.mark.pkcs11)]


@pytest.fixture(params=KEYSTORES)
def keystore_backend(request: pytest.FixtureRequest) -> str:
    """``soft`` (keys wrapped under a master key) or ``pkcs11`` (signing keys in a SoftHSM2
    token, every other key sealed under it)."""
    backend: str = request.param
    return backend


@pytest.fixture
def keystore(
    request: pytest.FixtureRequest, db: Database, keystore_backend: str
) -> Iterator[KeyStore]:
    if keystore_backend == "soft":
        yield SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
        return
    token: SoftHsmToken = request.getfixturevalue(
        "opencryptoki" if keystore_backend == "opencryptoki" else "softhsm_token"
    )
    store = HsmKeyStore(db, token.module, token.label, token.user_pin)
    yield store
    store.close()


@pytest.fixture
def tmk(db: Database, sessions: sessionmaker[Session], keystore: KeyStore, clock: Clock) -> Tmk:
    capability = Tmk.build(db, sessions, keystore, clock)
    capability.identity.ensure(actor="test")
    return capability


@pytest.fixture
def root_pem(tmk: Tmk) -> bytes:
    return tmk.identity.root().pem.encode()


@pytest.fixture
def make_terminal(tmp_path: Path, tmk: Tmk, root_pem: bytes) -> Callable[..., PosTerminal]:
    """A terminal made at the factory (and registered, unless told not to)."""
    counter = iter(range(1000))

    def make(
        sn: str = "POS-1", algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256, *, register: bool = True
    ) -> PosTerminal:
        directory = tmp_path / f"pos-{next(counter)}"
        record = PosTerminal.factory(directory, sn, algorithm, root_pem=root_pem)
        if register:
            tmk.register(record.public_key_pem, sn)
        return PosTerminal.open(directory)

    return make


@pytest.fixture
def terminal(make_terminal: Callable[..., PosTerminal]) -> PosTerminal:
    return make_terminal()


class ServiceTransport:
    """The HTTP routes' calls to the use cases, without HTTP (same error translation)."""

    def __init__(self, tmk: Tmk) -> None:
        self.tmk = tmk

    def post(self, path: str, body: bytes) -> bytes:
        parts = path.strip("/").split("/")
        downloads = self.tmk.downloads
        try:
            if parts == ["v1", "tmk", "downloads"]:
                return downloads.start(body, actor="gw").to_json()
            session_id, step = parts[3], parts[4]
            if step == "proof":
                return downloads.accept_proof(session_id, body, actor="gw").to_json()
            if step == "confirm":
                downloads.confirm(session_id, body, actor="gw")
                return b"{}"
            report = json.loads(body)
            ticket = base64.b64decode(report["ticket"]) if "ticket" in report else None
            downloads.abort(session_id, report["code"], actor="gw", ticket=ticket)
            return b"{}"
        except TrustfleetError as exc:  # what the API would answer as problem+json
            raise TmkServerRefused(exc.code, exc.message, exc.status) from exc

    def get(self, path: str) -> bytes:
        return self.tmk.identity.crl()


# -- a download step by step ------------------------------------------------------------


@dataclass
class Steps:
    """One download driven step by step (the terminal role in memory, the tmk as the
    HTTP routes call it)."""

    tmk: Tmk
    terminal: PosTerminal
    session: TerminalSession
    challenge: ServerChallenge | None = None
    delivery: KeyDelivery | None = None
    confirmation: Confirmation | None = None

    @property
    def session_id(self) -> str:
        assert self.challenge is not None
        return self.challenge.session_id

    def start(self) -> ServerChallenge:
        self.challenge = self.tmk.downloads.start(self.session.start().to_json(), actor="gw")
        return self.challenge

    def proof(self) -> KeyDelivery:
        assert self.challenge is not None
        proof = self.session.receive_challenge(self.challenge)
        downloads = self.tmk.downloads
        self.delivery = downloads.accept_proof(self.session_id, proof.to_json(), actor="gw")
        return self.delivery

    def confirm(self) -> Activation:
        assert self.delivery is not None
        self.confirmation = self.session.receive_delivery(self.delivery)
        return self.tmk.downloads.confirm(self.session_id, self.confirmation.to_json(), actor="gw")


def steps(
    tmk: Tmk,
    terminal: PosTerminal,
    clock: Clock,
    crls: tuple[x509.CertificateRevocationList, ...] = (),
    version: int = PROTOCOL_VERSION,
) -> Steps:
    trust = ServerTrust(terminal.roots, crls)
    session = TerminalSession(terminal.scm, trust, clock=clock, version=version)
    return Steps(tmk, terminal, session)


#: both protocol versions, for tests that run a download in each
VERSIONS = [pytest.param(PROTOCOL_V1, id="v1"), pytest.param(PROTOCOL_V2, id="v2")]


def download(
    tmk: Tmk, terminal: PosTerminal, clock: Clock, version: int = PROTOCOL_VERSION
) -> Activation:
    run = steps(tmk, terminal, clock, version=version)
    run.start()
    run.proof()
    return run.confirm()


# -- what the database holds ------------------------------------------------------------


def audit_records(sessions: sessionmaker[Session]) -> list[AuditRecord]:
    with sessions() as session:
        return list(iter_records(session))


def failures(sessions: sessionmaker[Session]) -> list[dict[str, object]]:
    """The details (and subject) of every ``tmk.download_failed`` record."""
    return [
        json.loads(r.details) | {"subject": r.subject}
        for r in audit_records(sessions)
        if r.action == "tmk.download_failed"
    ]


def tmks_of(sessions: sessionmaker[Session], sn: str) -> list[TerminalMasterKey]:
    with sessions() as session:
        query = select(TerminalMasterKey).where(TerminalMasterKey.sn == sn)
        return list(session.scalars(query.order_by(TerminalMasterKey.id)))


def session_row(sessions: sessionmaker[Session], session_id: str) -> DownloadSession:
    with sessions() as session:
        row = session.get(DownloadSession, session_id)
    assert row is not None
    return row


def assert_destroyed(keystore: KeyStore, handle: str) -> None:
    with pytest.raises(KeyNotFound):
        keystore.info(handle)


def assert_no_tmk_left(sessions: sessionmaker[Session], keystore: KeyStore, sn: str) -> None:
    """No TMK of ``sn`` is active, and every one ever made is destroyed in the key store."""
    for row in tmks_of(sessions, sn):
        assert row.status in ("aborted", "retired")
        assert row.destroyed_at is not None
        assert_destroyed(keystore, row.key_handle)
