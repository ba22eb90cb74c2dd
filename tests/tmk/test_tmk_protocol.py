"""TMK download, both roles in memory: full runs for every suite, and every attack the
protocol must refuse, each with its own error code.

Every message crosses a simulated wire (``to_json`` then ``from_json``) and the server's
state is persisted and reloaded between steps, as the service does between requests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from trustfleet.crypto import load_public_key
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.kcv import kcv as reference_kcv
from trustfleet.errors import KeyNotFound, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.pki import x509 as pki
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate
from trustfleet.tmk import errors
from trustfleet.tmk.conformance import forge_delivery
from trustfleet.tmk.protocol import (
    PROTOCOL_V1,
    PROTOCOL_V2,
    PROTOCOL_VERSION,
    Confirmation,
    DownloadRequest,
    KeyDelivery,
    RegisteredTerminal,
    ServerChallenge,
    ServerSessionState,
    ServerStage,
    ServerTrust,
    TerminalProof,
    TerminalSession,
    TerminalStage,
    TicketKey,
    TmkActivated,
    confirmation_data,
    key_delivery_tbs,
    keystore_kcv,
    open_ticket,
    parse_message,
    seal_ticket,
    server_abort,
    server_accept_proof,
    server_auth_tbs,
    server_confirm,
    server_start,
)
from trustfleet.tmk.scm import DeviceKey, SecureControlModule

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
SN = "POS-000123"


# =====================================================================================
# Fixtures: a key store, a KSRCRT/KSWCRT hierarchy, terminals
# =====================================================================================


@pytest.fixture(scope="module")
def keystore(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftKeyStore]:
    path = tmp_path_factory.mktemp("keystore") / "ks.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    yield SoftKeyStore(Database(engine), MasterKeyring([MasterKey.new()]))
    engine.dispose()


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    handle: str
    issuer: pki.Issuer


@dataclass(frozen=True)
class WorkKey:
    """The key server's work key (in the key store) and its certificate chain."""

    handle: str
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(Encoding.DER)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(Encoding.DER) for c in self.chain)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_root(keystore: KeyStore, name: str) -> Ca:
    handle = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN, label=name).handle
    public = pki.ca_public_key(keystore.public_key(handle), KeyAlgorithm.EC_P256)
    issuer = pki.self_issuer(
        _name(name), public, KeyAlgorithm.EC_P256, lambda tbs: keystore.sign(handle, tbs)
    )
    profile = pki.ca_profile(
        pki.CertificateKind.ROOT,
        name,
        public,
        path_length=1,
        not_before=NOW - timedelta(days=365),
        not_after=NOW + timedelta(days=3650),
    )
    return Ca(pki.issue_certificate(profile, issuer, pki.random_serial()), handle, issuer)


def _make_intermediate(keystore: KeyStore, parent: Ca, name: str) -> Ca:
    handle = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN, label=name).handle
    public = pki.ca_public_key(keystore.public_key(handle), KeyAlgorithm.EC_P256)
    profile = pki.ca_profile(
        pki.CertificateKind.INTERMEDIATE,
        name,
        public,
        path_length=0,
        not_before=NOW - timedelta(days=300),
        not_after=NOW + timedelta(days=1000),
    )
    cert = pki.issue_certificate(profile, parent.issuer, pki.random_serial())
    issuer = pki.issuer_from_certificate(
        cert, KeyAlgorithm.EC_P256, lambda tbs: keystore.sign(handle, tbs)
    )
    return Ca(cert, handle, issuer)


def _make_work_key(
    keystore: KeyStore,
    issuer: Ca,
    *,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    not_after: datetime = NOW + timedelta(days=365),
    chain: tuple[x509.Certificate, ...] = (),
) -> WorkKey:
    handle = keystore.generate(algorithm, KeyUsage.SIGN, label="kswcrt").handle
    profile = pki.server_profile(
        keystore.public_key(handle),  # type: ignore[arg-type]
        ["tmk.keyserver.example"],
        [],
        not_before=NOW - timedelta(days=30),
        not_after=not_after,
    )
    return WorkKey(
        handle, pki.issue_certificate(profile, issuer.issuer, pki.random_serial()), chain
    )


@pytest.fixture(scope="module")
def root(keystore: SoftKeyStore) -> Ca:
    return _make_root(keystore, "ksrcrt")


@pytest.fixture(scope="module")
def work(keystore: SoftKeyStore, root: Ca) -> WorkKey:
    return _make_work_key(keystore, root)


@pytest.fixture(scope="module")
def trust(root: Ca) -> ServerTrust:
    return ServerTrust(roots=(root.cert,))


@dataclass
class Terminal:
    scm: SecureControlModule
    registration: RegisteredTerminal
    path: Path


def _registration(scm: SecureControlModule) -> RegisteredTerminal:
    record = scm.record()
    kem = record.kem_public_key_pem
    return RegisteredTerminal(
        sn=record.sn,
        auth_public=load_public_key(record.public_key_pem.encode()),
        kem_public=load_public_key(kem.encode()) if kem else None,
    )


@pytest.fixture
def make_terminal(tmp_path: Path) -> Callable[..., Terminal]:
    device_key = DeviceKey.generate_file(tmp_path / "device.key")
    counter = iter(range(1000))

    def make(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256, sn: str = SN) -> Terminal:
        path = tmp_path / f"scm-{next(counter)}.json"
        SecureControlModule.factory(path, sn, algorithm, device_key=device_key)
        scm = SecureControlModule.open(path, device_key)
        return Terminal(scm, _registration(scm), path)

    return make


@pytest.fixture
def terminal(make_terminal: Callable[..., Terminal]) -> Terminal:
    return make_terminal()


# =====================================================================================
# Driving both roles over a simulated wire
# =====================================================================================


def wire(message: Any) -> Any:
    """Serialise and parse again, as a transport would."""
    return type(message).from_json(message.to_json())


def ticket_key(keystore: KeyStore, key_id: int = 7) -> TicketKey:
    handle = keystore.generate(KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC, label="ticket").handle
    return TicketKey(key_id, handle)


def persist(state: ServerSessionState) -> ServerSessionState:
    """Store and reload the server state, as the service does between requests."""
    return ServerSessionState.from_json(state.to_json())


@dataclass
class Run:
    session: TerminalSession
    request: DownloadRequest | None = None
    challenge: ServerChallenge | None = None
    state: ServerSessionState | None = None
    proof: TerminalProof | None = None
    delivery: KeyDelivery | None = None
    confirmation: Confirmation | None = None
    event: TmkActivated | None = None

    def messages(self) -> list[Any]:
        found = [self.request, self.challenge, self.proof, self.delivery, self.confirmation]
        return [m for m in found if m is not None]


class Server:
    """The server role as the service drives it: state persisted between steps."""

    def __init__(self, keystore: KeyStore, work: WorkKey, terminal: RegisteredTerminal):
        self.keystore = keystore
        self.work = work
        self.terminal = terminal
        self.ticket_key = ticket_key(keystore)

    def start(
        self, request: DownloadRequest, now: datetime = NOW
    ) -> tuple[ServerChallenge, ServerSessionState]:
        """The challenge, and the state its ticket carries back (what the service uses)."""
        challenge, state = server_start(
            wire(request),
            terminal=self.terminal,
            keystore=self.keystore,
            work_key=self.work.handle,
            kswcrt_der=self.work.der,
            ticket_key=self.ticket_key,
            chain_der=self.work.chain_der,
            now=now,
        )
        opened = self.open(wire(challenge).ticket)
        assert opened == state
        return challenge, opened

    def open(self, ticket: bytes) -> ServerSessionState:
        keys = {self.ticket_key.key_id: self.ticket_key.handle}
        return open_ticket(ticket, keystore=self.keystore, key_for=keys.get)

    def accept(
        self,
        state: ServerSessionState,
        proof: TerminalProof,
        now: datetime = NOW,
        algorithm: KeyAlgorithm = KeyAlgorithm.AES_128,
    ) -> tuple[KeyDelivery, ServerSessionState]:
        delivery, new_state = server_accept_proof(
            state,
            wire(proof),
            terminal=self.terminal,
            keystore=self.keystore,
            now=now,
            tmk_algorithm=algorithm,
            work_key=self.work.handle,
        )
        return delivery, persist(new_state)

    def confirm(
        self, state: ServerSessionState, confirmation: Confirmation, now: datetime = NOW
    ) -> tuple[TmkActivated, ServerSessionState]:
        event, new_state = server_confirm(
            state, wire(confirmation), keystore=self.keystore, now=now
        )
        return event, persist(new_state)


def download(
    terminal: Terminal,
    server: Server,
    trust: ServerTrust,
    *,
    algorithm: KeyAlgorithm = KeyAlgorithm.AES_128,
    clock: Callable[[], datetime] = lambda: NOW,
) -> Run:
    run = Run(TerminalSession(terminal.scm, trust, clock=clock))
    run.request = run.session.start()
    run.challenge, run.state = server.start(run.request)
    run.proof = run.session.receive_challenge(wire(run.challenge))
    run.delivery, run.state = server.accept(run.state, run.proof, algorithm=algorithm)
    run.confirmation = run.session.receive_delivery(wire(run.delivery))
    run.event, run.state = server.confirm(run.state, run.confirmation)
    return run


def tmk_of(scm: SecureControlModule) -> bytes:
    """White box: the SCM's internal copy of the TMK, read only to search for it elsewhere."""
    tmk = scm._tmk
    assert tmk is not None
    return tmk.key


def assert_secret_absent(secret: bytes, blob: bytes) -> None:
    """``secret`` appears in ``blob`` neither raw, nor as hex, nor inside any base64 value."""
    assert secret not in blob
    assert secret.hex().encode() not in blob
    assert secret.hex().upper().encode() not in blob
    for token in _json_strings(blob):
        try:
            decoded = base64.b64decode(token, validate=True)
        except ValueError:
            continue
        assert secret not in decoded


def _json_strings(blob: bytes) -> Iterator[str]:
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    yield from walk(json.loads(blob))


def flip(data: bytes, index: int = -1) -> bytes:
    tampered = bytearray(data)
    tampered[index] ^= 0x01
    return bytes(tampered)


# =====================================================================================
# Full downloads
# =====================================================================================

TKP_CASES = [
    pytest.param(KeyAlgorithm.EC_P256, "p256", id="p256"),
    pytest.param(KeyAlgorithm.RSA_2048, "rsa", id="rsa-2048"),
    pytest.param(KeyAlgorithm.RSA_3072, "rsa", id="rsa-3072"),
    pytest.param(KeyAlgorithm.SM2, "gm", id="gm-sm2"),
    pytest.param(KeyAlgorithm.ED25519, "ed25519", id="ed25519+x25519"),
]


@pytest.mark.parametrize(("algorithm", "suite"), TKP_CASES)
@pytest.mark.parametrize("tmk_algorithm", [KeyAlgorithm.AES_128, KeyAlgorithm.AES_256])
def test_full_download_installs_the_same_tmk_on_both_sides(
    make_terminal: Callable[..., Terminal],
    keystore: SoftKeyStore,
    work: WorkKey,
    trust: ServerTrust,
    algorithm: KeyAlgorithm,
    suite: str,
    tmk_algorithm: KeyAlgorithm,
) -> None:
    terminal = make_terminal(algorithm)
    run = download(
        terminal, Server(keystore, work, terminal.registration), trust, algorithm=tmk_algorithm
    )

    assert run.request is not None and run.request.suite == suite
    assert run.session.stage is TerminalStage.CONFIRMED
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE
    assert run.event is not None and run.event.sn == SN
    assert run.event.algorithm is tmk_algorithm
    # the terminal holds the very key the server's store holds: their CMACs agree
    probe = b"working key check"
    assert terminal.scm.tmk_cmac(probe) == keystore.mac(run.event.tmk_handle, probe)
    assert (
        terminal.scm.tmk_kcv == run.event.kcv == reference_kcv(tmk_algorithm, tmk_of(terminal.scm))
    )
    # the server's TMK never leaves its store in the clear
    info = keystore.info(run.event.tmk_handle)
    assert not info.exportable and info.algorithm is tmk_algorithm
    # and survives a restart of the terminal
    reopened = SecureControlModule.open(terminal.path, terminal.scm._device_key)
    assert reopened.tmk_cmac(probe) == terminal.scm.tmk_cmac(probe)


@pytest.mark.parametrize(("algorithm", "suite"), TKP_CASES)
def test_tmk_never_appears_in_clear_on_the_wire_in_state_or_on_disk(
    make_terminal: Callable[..., Terminal],
    keystore: SoftKeyStore,
    work: WorkKey,
    trust: ServerTrust,
    algorithm: KeyAlgorithm,
    suite: str,
) -> None:
    terminal = make_terminal(algorithm)
    run = download(terminal, Server(keystore, work, terminal.registration), trust)
    tmk = tmk_of(terminal.scm)

    for message in run.messages():
        assert_secret_absent(tmk, message.to_json())
    assert run.state is not None
    assert_secret_absent(tmk, run.state.to_json())
    assert_secret_absent(tmk, terminal.path.read_bytes())
    assert tmk.hex() not in repr(terminal.scm) + repr(run.event) + repr(run.state)


def test_ed25519_terminals_receive_the_tmk_on_their_x25519_key(
    make_terminal: Callable[..., Terminal],
) -> None:
    terminal = make_terminal(KeyAlgorithm.ED25519)
    reg = terminal.registration
    assert reg.kem_public is not None
    assert reg.transport_key is reg.kem_public
    # without its X25519 key an Ed25519 terminal cannot be served at all
    with pytest.raises(errors.TmkUnsupportedSuite):
        _ = replace(reg, kem_public=None).transport_key


def test_an_rsa_work_key_and_an_intermediate_ca_are_accepted(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, trust: ServerTrust
) -> None:
    intermediate = _make_intermediate(keystore, root, "ks-issuing")
    work = _make_work_key(
        keystore, intermediate, algorithm=KeyAlgorithm.RSA_2048, chain=(intermediate.cert,)
    )
    run = download(terminal, Server(keystore, work, terminal.registration), trust)
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.ED25519, KeyAlgorithm.RSA_3072], ids=["ed25519", "rsa-3072"]
)
def test_other_work_key_algorithms(
    terminal: Terminal,
    keystore: SoftKeyStore,
    root: Ca,
    trust: ServerTrust,
    algorithm: KeyAlgorithm,
) -> None:
    work = _make_work_key(keystore, root, algorithm=algorithm)
    run = download(terminal, Server(keystore, work, terminal.registration), trust)
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE


class _NoKcvKeyStore(SoftKeyStore):
    """A key store that, like the PKCS#11 backend, cannot compute KCVs."""

    def __init__(self, inner: SoftKeyStore) -> None:
        super().__init__(inner._db, inner.master)

    def kcv(self, handle: str) -> bytes:
        raise UnsupportedAlgorithm("this key store cannot compute KCVs")


def test_tdes_tmk_download(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    run = download(
        terminal, Server(keystore, work, terminal.registration), trust, algorithm=KeyAlgorithm.TDES
    )
    assert run.delivery is not None and len(run.delivery.kcv) == 3
    assert run.delivery.kcv == reference_kcv(KeyAlgorithm.TDES, tmk_of(terminal.scm))
    assert run.confirmation is not None and len(run.confirmation.mac) == 8  # TDES-CMAC
    assert terminal.scm.tmk_algorithm is KeyAlgorithm.TDES
    assert run.event is not None and run.state is not None
    assert run.state.stage is ServerStage.ACTIVE
    assert not keystore.info(run.event.tmk_handle).exportable


def test_a_key_store_without_kcvs_refuses_the_download_and_leaves_no_key_behind(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    store = _NoKcvKeyStore(keystore)
    server = Server(store, work, terminal.registration)
    session = TerminalSession(terminal.scm, trust, clock=lambda: NOW)
    challenge, state = server.start(session.start())
    proof = session.receive_challenge(challenge)
    before = {k.handle for k in store.list()}
    with pytest.raises(errors.TmkUnsupportedSuite):
        server.accept(state, proof, algorithm=KeyAlgorithm.TDES)
    assert {k.handle for k in store.list()} == before


def test_aes_kcv_from_the_key_store_equals_the_reference_kcv(keystore: SoftKeyStore) -> None:
    for algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        info = keystore.generate(algorithm, KeyUsage.MAC, exportable=True)
        expected = reference_kcv(algorithm, keystore.export(info.handle))
        assert keystore_kcv(keystore, info.handle, algorithm) == expected


# =====================================================================================
# Attacks: each refused with its own code
# =====================================================================================


def _started(
    terminal: Terminal,
    server: Server,
    trust: ServerTrust,
    clock: Callable[[], datetime] = lambda: NOW,
    version: int = PROTOCOL_VERSION,
) -> tuple[TerminalSession, ServerChallenge, ServerSessionState]:
    session = TerminalSession(terminal.scm, trust, clock=clock, version=version)
    challenge, state = server.start(session.start())
    return session, challenge, state


def _proved(
    terminal: Terminal, server: Server, trust: ServerTrust, version: int = PROTOCOL_VERSION
) -> tuple[TerminalSession, TerminalProof, ServerSessionState]:
    session, challenge, state = _started(terminal, server, trust, version=version)
    return session, session.receive_challenge(challenge), state


def _delivered(
    terminal: Terminal, server: Server, trust: ServerTrust, version: int = PROTOCOL_VERSION
) -> tuple[TerminalSession, KeyDelivery, ServerSessionState]:
    session, proof, state = _proved(terminal, server, trust, version)
    delivery, state = server.accept(state, proof)
    return session, delivery, state


#: how a changed delivery ends: in version 1 when the SCM opens it; in version 2 at the
#: work key's signature over it, before the SCM is asked to open anything
DELIVERY_CHECKS = [
    pytest.param(PROTOCOL_V1, id="v1"),
    pytest.param(PROTOCOL_V2, id="v2"),
]


def _refused_delivery(version: int, v1_error: type[errors.TmkError]) -> type[errors.TmkError]:
    return v1_error if version == PROTOCOL_V1 else errors.TmkBadDeliverySignature


def test_challenge_of_session_a_replayed_into_session_b_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, challenge_a, _ = _started(terminal, server, trust)
    session_b, _, _ = _started(terminal, server, trust)
    with pytest.raises(errors.TmkReplay) as caught:
        session_b.receive_challenge(challenge_a)
    assert caught.value.code == "tmk-replay"
    assert session_b.stage is TerminalStage.FAILED


def test_challenge_with_the_echoed_random_rewritten_fails_the_signature(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, challenge_a, _ = _started(terminal, server, trust)
    session_b = TerminalSession(terminal.scm, trust, clock=lambda: NOW)
    request_b = session_b.start()
    forged = replace(challenge_a, rnd1=request_b.rnd1)
    with pytest.raises(errors.TmkBadServerSignature) as caught:
        session_b.receive_challenge(forged)
    assert caught.value.code == "tmk-bad-server-signature"


@pytest.mark.parametrize("field", ["rnd2", "session_id", "expires_at", "signature"])
def test_any_change_to_a_signed_challenge_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust, field: str
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, challenge, _ = _started(terminal, server, trust)
    changes: dict[str, Any] = {
        "rnd2": flip(challenge.rnd2),
        "session_id": "0" * 32,
        "expires_at": challenge.expires_at + timedelta(hours=1),
        "signature": flip(challenge.signature),
    }
    with pytest.raises(errors.TmkBadServerSignature):
        session.receive_challenge(replace(challenge, **{field: changes[field]}))


def test_a_server_holding_the_genuine_certificate_but_not_its_key_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    impostor_key = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN).handle
    impostor = Server(keystore, WorkKey(impostor_key, work.cert), terminal.registration)
    session, challenge, _ = _started(terminal, impostor, trust)
    with pytest.raises(errors.TmkBadServerSignature):
        session.receive_challenge(challenge)


def test_a_server_certificate_from_another_root_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, trust: ServerTrust
) -> None:
    evil_root = _make_root(keystore, "ksrcrt")  # same name, other key
    evil = Server(keystore, _make_work_key(keystore, evil_root), terminal.registration)
    session, challenge, _ = _started(terminal, evil, trust)
    with pytest.raises(errors.TmkUntrustedServerCertificate) as caught:
        session.receive_challenge(challenge)
    assert caught.value.code == "tmk-untrusted-server-certificate"
    assert not terminal.scm.has_tmk


def test_an_expired_work_certificate_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, trust: ServerTrust
) -> None:
    stale = _make_work_key(keystore, root, not_after=NOW - timedelta(seconds=1))
    session, challenge, _ = _started(
        terminal, Server(keystore, stale, terminal.registration), trust
    )
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)


def test_the_root_itself_is_no_work_certificate(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, trust: ServerTrust
) -> None:
    as_work = WorkKey(root.handle, root.cert)
    session, challenge, _ = _started(
        terminal, Server(keystore, as_work, terminal.registration), trust
    )
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)


def _pyca_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("pyca-root"))
        .issuer_name(_name("pyca-root"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=not digital_signature,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.mark.parametrize(
    ("is_ca", "digital_signature", "accepted"),
    [
        pytest.param(False, True, True, id="signing-leaf-accepted"),
        pytest.param(True, True, False, id="ca-as-work-cert"),
        pytest.param(False, False, False, id="no-digital-signature"),
    ],
)
def test_the_work_certificate_must_be_a_signing_end_entity(
    terminal: Terminal, keystore: SoftKeyStore, is_ca: bool, digital_signature: bool, accepted: bool
) -> None:
    root_key, root_cert = _pyca_root()
    handle = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN).handle
    public = keystore.public_key(handle)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("work"))
        .issuer_name(root_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=digital_signature, cert_sign=is_ca), critical=True
        )
        .sign(root_key, hashes.SHA256())
    )
    trust = ServerTrust(roots=(root_cert,))
    server = Server(keystore, WorkKey(handle, leaf), terminal.registration)
    session, challenge, _ = _started(terminal, server, trust)
    if accepted:
        session.receive_challenge(challenge)
        assert session.stage is TerminalStage.PROVED
    else:
        with pytest.raises(errors.TmkUntrustedServerCertificate):
            session.receive_challenge(challenge)


def test_a_missing_intermediate_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, trust: ServerTrust
) -> None:
    intermediate = _make_intermediate(keystore, root, "ks-issuing")
    work = _make_work_key(keystore, intermediate)  # chain not sent
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)


def test_garbage_instead_of_a_certificate_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(replace(challenge, kswcrt_der=b"\x30\x03\x02\x01\x00"))


def _crl(
    ca: Ca, revoked: list[int], *, next_update: datetime = NOW + timedelta(days=7)
) -> x509.CertificateRevocationList:
    entries = [
        pki.RevokedEntry(serial, NOW - timedelta(days=1), pki.RevocationReason.KEY_COMPROMISE)
        for serial in revoked
    ]
    return pki.build_crl(
        ca.issuer,
        number=1,
        this_update=NOW - timedelta(hours=1),
        next_update=next_update,
        revoked=entries,
    )


def test_a_revoked_work_certificate_is_refused_when_the_terminal_has_the_crl(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    trust = ServerTrust(roots=(root.cert,), crls=(_crl(root, [work.cert.serial_number]),))
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkRevokedServerCertificate) as caught:
        session.receive_challenge(challenge)
    assert caught.value.code == "tmk-revoked-server-certificate"


def test_a_revoked_intermediate_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca
) -> None:
    intermediate = _make_intermediate(keystore, root, "ks-issuing")
    work = _make_work_key(keystore, intermediate, chain=(intermediate.cert,))
    trust = ServerTrust(roots=(root.cert,), crls=(_crl(root, [intermediate.cert.serial_number]),))
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkRevokedServerCertificate):
        session.receive_challenge(challenge)


def test_a_current_crl_that_does_not_list_the_work_certificate_lets_it_through(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    other = _make_work_key(keystore, root)
    trust = ServerTrust(roots=(root.cert,), crls=(_crl(root, [other.cert.serial_number]),))
    run = download(terminal, Server(keystore, work, terminal.registration), trust)
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE


def test_an_out_of_date_crl_fails_closed(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    stale = _crl(root, [], next_update=NOW - timedelta(minutes=1))
    trust = ServerTrust(roots=(root.cert,), crls=(stale,))
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)


def test_a_crl_not_signed_by_the_issuer_fails_closed(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    forged_root = _make_root(keystore, "ksrcrt")  # same issuer name, other key
    trust = ServerTrust(roots=(root.cert,), crls=(_crl(forged_root, []),))
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)


def test_a_forged_crl_cannot_hide_a_genuine_revocation(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    forged_root = _make_root(keystore, "ksrcrt")
    forged = _crl(forged_root, [])  # claims nothing is revoked, signed by another key
    genuine = _crl(root, [work.cert.serial_number])
    trust = ServerTrust(roots=(root.cert,), crls=(forged, genuine))
    session, challenge, _ = _started(terminal, Server(keystore, work, terminal.registration), trust)
    with pytest.raises(errors.TmkRevokedServerCertificate):
        session.receive_challenge(challenge)


def test_a_stale_crl_beside_a_current_one_is_ignored(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, work: WorkKey
) -> None:
    stale = _crl(root, [], next_update=NOW - timedelta(minutes=1))
    current = _crl(root, [])
    trust = ServerTrust(roots=(root.cert,), crls=(stale, current))
    run = download(terminal, Server(keystore, work, terminal.registration), trust)
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE


def test_a_proof_signed_with_another_terminals_key_is_refused(
    make_terminal: Callable[..., Terminal],
    keystore: SoftKeyStore,
    work: WorkKey,
    trust: ServerTrust,
) -> None:
    victim = make_terminal()
    impostor = make_terminal(sn=SN)  # claims the victim's SN, holds its own TKP
    server = Server(keystore, work, victim.registration)  # the server looks up the victim's key
    _, proof, state = _proved(impostor, server, trust)
    before = {k.handle for k in keystore.list()}
    with pytest.raises(errors.TmkBadTerminalProof) as caught:
        server.accept(state, proof)
    assert caught.value.code == "tmk-bad-terminal-proof"
    assert {k.handle for k in keystore.list()} == before  # no TMK was generated


def test_a_proof_from_session_a_is_refused_in_session_b(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, proof_a, _ = _proved(terminal, server, trust)
    _, _, state_b = _proved(terminal, server, trust)
    with pytest.raises(errors.TmkReplay):
        server.accept(state_b, proof_a)
    with pytest.raises(errors.TmkBadTerminalProof):  # relabelled: the signature gives it away
        server.accept(state_b, replace(proof_a, session_id=state_b.session_id))


def test_a_terminal_asking_for_another_suite_than_registered_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey
) -> None:
    server = Server(keystore, work, terminal.registration)
    request = DownloadRequest(sn=SN, rnd1=bytes(32), suite="rsa")
    with pytest.raises(errors.TmkUnsupportedSuite):
        server.start(request)


def test_an_expired_session_is_refused_at_every_server_step(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, proof, state = _proved(terminal, server, trust)
    with pytest.raises(errors.TmkSessionExpired) as caught:
        server.accept(state, proof, now=state.expires_at)
    assert caught.value.code == "tmk-session-expired"

    session, delivery, state = _delivered(terminal, server, trust)
    confirmation = session.receive_delivery(delivery)
    with pytest.raises(errors.TmkSessionExpired):
        server.confirm(state, confirmation, now=NOW + timedelta(seconds=61))
    # the default lifetime is 60 s: one second before, it still works
    _, state = server.confirm(state, confirmation, now=NOW + timedelta(seconds=59))
    assert state.stage is ServerStage.ACTIVE


def test_the_terminal_refuses_an_expired_challenge_and_an_expired_delivery(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    later = NOW + timedelta(minutes=5)
    session, challenge, _ = _started(terminal, server, trust, clock=lambda: later)
    with pytest.raises(errors.TmkSessionExpired):
        session.receive_challenge(challenge)

    clock = [NOW]
    session, challenge, state = _started(terminal, server, trust, clock=lambda: clock[0])
    delivery, _ = server.accept(state, session.receive_challenge(challenge))
    clock[0] = later
    with pytest.raises(errors.TmkSessionExpired):
        session.receive_delivery(delivery)
    assert not terminal.scm.has_tmk


@pytest.mark.parametrize("version", DELIVERY_CHECKS)
def test_a_tampered_wrapped_tmk_is_refused_and_nothing_is_stored(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust, version: int
) -> None:
    session, delivery, _ = _delivered(
        terminal, Server(keystore, work, terminal.registration), trust, version
    )
    expected = _refused_delivery(version, errors.TmkUnwrapFailed)
    with pytest.raises(expected) as caught:
        session.receive_delivery(replace(delivery, wrapped_tmk=flip(delivery.wrapped_tmk, 40)))
    assert caught.value.code == expected.code
    assert not terminal.scm.has_tmk
    assert session.stage is TerminalStage.FAILED


@pytest.mark.parametrize("version", DELIVERY_CHECKS)
def test_a_tampered_kcv_is_refused_and_nothing_is_stored(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust, version: int
) -> None:
    session, delivery, _ = _delivered(
        terminal, Server(keystore, work, terminal.registration), trust, version
    )
    expected = _refused_delivery(version, errors.TmkKcvMismatch)
    with pytest.raises(expected) as caught:
        session.receive_delivery(replace(delivery, kcv=flip(delivery.kcv)))
    assert caught.value.code == expected.code
    assert not SecureControlModule.open(terminal.path, terminal.scm._device_key).has_tmk


@pytest.mark.parametrize("version", DELIVERY_CHECKS)
def test_a_relabelled_tmk_algorithm_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust, version: int
) -> None:
    session, delivery, _ = _delivered(
        terminal, Server(keystore, work, terminal.registration), trust, version
    )
    relabelled = replace(delivery, algorithm=KeyAlgorithm.TDES, kcv=delivery.kcv[:3])
    # the algorithm is bound into the transport (and, in version 2, signed)
    with pytest.raises(_refused_delivery(version, errors.TmkUnwrapFailed)):
        session.receive_delivery(relabelled)


@pytest.mark.parametrize("version", DELIVERY_CHECKS)
def test_a_delivery_from_another_session_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust, version: int
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, delivery_a, _ = _delivered(terminal, server, trust, version)
    session_b, _, _ = _delivered(terminal, server, trust, version)
    with pytest.raises(errors.TmkReplay):
        session_b.receive_delivery(delivery_a)
    session_c, _, _ = _delivered(terminal, server, trust, version)
    assert session_c.session_id is not None
    # relabelled: bound to session A's transcript (and, in version 2, signed for it)
    with pytest.raises(_refused_delivery(version, errors.TmkUnwrapFailed)):
        session_c.receive_delivery(replace(delivery_a, session_id=session_c.session_id))
    assert not terminal.scm.has_tmk


def test_a_wrong_confirmation_mac_is_refused_and_the_tmk_never_activates(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, delivery, state = _delivered(terminal, server, trust)
    confirmation = session.receive_delivery(delivery)
    with pytest.raises(errors.TmkBadConfirmation) as caught:
        server.confirm(state, replace(confirmation, mac=flip(confirmation.mac)))
    assert caught.value.code == "tmk-bad-confirmation"
    # the service ends the session: the unconfirmed TMK is destroyed, no retry is possible
    aborted = persist(server_abort(state, keystore=keystore))
    assert aborted.stage is ServerStage.ABORTED
    assert state.tmk_handle is not None
    with pytest.raises(KeyNotFound):
        keystore.info(state.tmk_handle)
    with pytest.raises(errors.TmkOutOfOrder):
        server.confirm(aborted, confirmation)


def test_a_confirmation_of_another_session_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session_a, delivery_a, _ = _delivered(terminal, server, trust)
    confirmation_a = session_a.receive_delivery(delivery_a)
    _, _, state_b = _delivered(terminal, server, trust)
    with pytest.raises(errors.TmkReplay):
        server.confirm(state_b, confirmation_a)
    with pytest.raises(errors.TmkBadConfirmation):  # relabelled: MAC under another TMK
        server.confirm(state_b, replace(confirmation_a, session_id=state_b.session_id))


def test_a_confirmation_mac_over_other_data_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, delivery, state = _delivered(terminal, server, trust)
    session.receive_delivery(delivery)
    # a CMAC under the right TMK, but not over the confirmation data of this session
    version = state.version
    data = confirmation_data(session_id="f" * 32, kcv=delivery.kcv, version=version)
    other = terminal.scm.tmk_cmac(data)
    with pytest.raises(errors.TmkBadConfirmation):
        server.confirm(state, Confirmation(session_id=state.session_id, mac=other, version=version))
    # nor the data of this session under the other version's label
    v1_data = confirmation_data(session_id=state.session_id, kcv=delivery.kcv, version=1)
    with pytest.raises(errors.TmkBadConfirmation):
        server.confirm(
            state,
            Confirmation(
                session_id=state.session_id, mac=terminal.scm.tmk_cmac(v1_data), version=version
            ),
        )


# =====================================================================================
# Protocol versions: version 2 authenticates the delivery, and cannot be downgraded
# =====================================================================================


def _forged(
    terminal: Terminal, challenge: ServerChallenge, genuine: KeyDelivery
) -> tuple[KeyDelivery, bytes]:
    """An on-path attacker's delivery: a TMK of their choosing, wrapped to the terminal's
    registered key and bound to the session's public values, with its true KCV."""
    return forge_delivery(
        genuine,
        challenge,
        sn=terminal.scm.sn,
        terminal_key=terminal.registration.auth_public,
        kem_key=terminal.registration.transport_key,
        tmk=bytes(range(32 if genuine.algorithm is KeyAlgorithm.AES_256 else 16)),
    )


@pytest.mark.parametrize(
    ("algorithm", "tmk_algorithm"),
    [
        pytest.param(KeyAlgorithm.EC_P256, KeyAlgorithm.AES_128, id="p256-aes-128"),
        pytest.param(KeyAlgorithm.RSA_2048, KeyAlgorithm.TDES, id="rsa-tdes"),
        pytest.param(KeyAlgorithm.SM2, KeyAlgorithm.AES_256, id="gm-aes-256"),
    ],
)
def test_a_v2_terminal_refuses_a_delivery_forged_from_public_values(
    make_terminal: Callable[..., Terminal],
    keystore: SoftKeyStore,
    work: WorkKey,
    trust: ServerTrust,
    algorithm: KeyAlgorithm,
    tmk_algorithm: KeyAlgorithm,
) -> None:
    terminal = make_terminal(algorithm)
    server = Server(keystore, work, terminal.registration)
    session, challenge, state = _started(terminal, server, trust, version=PROTOCOL_V2)
    genuine, _ = server.accept(state, session.receive_challenge(challenge), algorithm=tmk_algorithm)
    forged, chosen = _forged(terminal, challenge, genuine)
    assert forged.kcv == reference_kcv(tmk_algorithm, chosen)  # everything but the signature
    with pytest.raises(errors.TmkBadDeliverySignature) as caught:
        session.receive_delivery(wire(forged))
    assert caught.value.code == "tmk-bad-delivery-signature"
    assert caught.value.status == 403
    assert not terminal.scm.has_tmk  # never opened: the signature is checked first
    assert session.stage is TerminalStage.FAILED
    with pytest.raises(errors.TmkOutOfOrder):  # not even the genuine one after that
        session.receive_delivery(genuine)


def test_a_v1_terminal_installs_a_forged_delivery_which_is_why_there_is_v2(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    """The weakness version 2 removes (docs/tmk-protocol.md, "Security notes"): a version 1
    terminal cannot tell a forged delivery from the server's; only the confirmation, too
    late for the terminal, shows it."""
    server = Server(keystore, work, terminal.registration)
    session, challenge, state = _started(terminal, server, trust, version=PROTOCOL_V1)
    genuine, delivered = server.accept(state, session.receive_challenge(challenge))
    forged, chosen = _forged(terminal, challenge, genuine)
    confirmation = session.receive_delivery(wire(forged))
    assert terminal.scm.tmk_kcv == reference_kcv(KeyAlgorithm.AES_128, chosen)
    with pytest.raises(errors.TmkBadConfirmation):
        server.confirm(delivered, confirmation)


def test_a_delivery_signature_that_is_not_the_work_keys_over_tbs3_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, challenge, state = _started(terminal, server, trust, version=PROTOCOL_V2)
    genuine, _ = server.accept(state, session.receive_challenge(challenge))
    assert genuine.signature is not None
    forged, _ = _forged(terminal, challenge, genuine)
    tbs3 = key_delivery_tbs(
        sn=state.sn,
        suite=state.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        algorithm=forged.algorithm,
        wrapped_tmk=forged.wrapped_tmk,
        kcv=forged.kcv,
    )
    own_key = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN).handle
    tbs1 = server_auth_tbs(
        sn=state.sn,
        suite=state.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        expires_at=state.expires_at,
        version=PROTOCOL_V2,
    )
    for signature in (
        keystore.sign(own_key, tbs3),  # the right TBS3, signed by another key
        keystore.sign(work.handle, tbs1),  # the work key's, over another of its transcripts
        flip(genuine.signature),
    ):
        again, again_challenge, again_state = _started(terminal, server, trust, version=2)
        delivered, _ = server.accept(again_state, again.receive_challenge(again_challenge))
        refused = replace(delivered, signature=signature)
        with pytest.raises(errors.TmkBadDeliverySignature):
            again.receive_delivery(refused)
    assert not terminal.scm.has_tmk
    # the same forgery with the work key's own signature over its TBS3 would be accepted:
    # the refusals above are the signature's doing
    accepted = replace(forged, signature=keystore.sign(work.handle, tbs3))
    session.receive_delivery(accepted)
    assert terminal.scm.has_tmk


def test_the_server_signs_tbs3_of_what_it_delivers_with_the_challenges_work_key(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, challenge, state = _started(terminal, server, trust, version=PROTOCOL_V2)
    delivery, delivered = server.accept(state, session.receive_challenge(challenge))
    assert delivery.version == delivered.version == PROTOCOL_V2
    assert delivery.signature is not None
    tbs3 = key_delivery_tbs(
        sn=SN,
        suite=terminal.scm.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        algorithm=delivery.algorithm,
        wrapped_tmk=delivery.wrapped_tmk,
        kcv=delivery.kcv,
    )
    assert tbs3.startswith(b"\x00\x00\x00\x16TF-TMK-v2 key-delivery\x00\x00\x00\x20")
    work_public = work.cert.public_key()
    assert isinstance(work_public, ec.EllipticCurvePublicKey)
    work_public.verify(delivery.signature, tbs3, ec.ECDSA(hashes.SHA256()))
    # the state and its ticket say the version; a version 1 state has no such key
    assert json.loads(delivered.to_json())["version"] == PROTOCOL_V2
    assert json.loads(challenge.ticket[5:-32])["version"] == PROTOCOL_V2
    _, _, v1_state = _started(terminal, server, trust, version=PROTOCOL_V1)
    assert "version" not in json.loads(v1_state.to_json())
    with pytest.raises(errors.TmkMalformedMessage):  # one encoding per state
        ServerSessionState.from_json(
            json.dumps({**json.loads(v1_state.to_json()), "version": 1}).encode()
        )


def test_a_v2_session_without_its_work_key_delivers_nothing(
    terminal: Terminal, keystore: SoftKeyStore, root: Ca, trust: ServerTrust
) -> None:
    """The work key that signed the challenge was destroyed since (a rotation): the
    delivery cannot be signed by it, and no TMK is left behind."""
    gone = _make_work_key(keystore, root)
    server = Server(keystore, gone, terminal.registration)
    session, challenge, state = _started(terminal, server, trust, version=PROTOCOL_V2)
    proof = session.receive_challenge(challenge)
    keystore.destroy(gone.handle)
    before = {k.handle for k in keystore.list()}
    with pytest.raises(errors.TmkInvalidTicket):
        server.accept(state, proof)
    assert {k.handle for k in keystore.list()} == before
    with pytest.raises(ValueError, match="work key"):  # and the caller must give one
        server_accept_proof(
            state, proof, terminal=terminal.registration, keystore=keystore, now=NOW
        )


def test_a_request_rewritten_to_v1_on_the_way_is_refused_by_the_v2_terminal(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    """The request is not signed: anyone on the path can change its "v". The server then
    answers in version 1; the terminal asked for 2 and refuses. Rewriting the answer's "v"
    back does not help: TBS1's label names the version it was signed in."""
    server = Server(keystore, work, terminal.registration)
    session = TerminalSession(terminal.scm, trust, clock=lambda: NOW, version=PROTOCOL_V2)
    request = session.start()
    assert request.version == PROTOCOL_V2
    challenge, state = server.start(replace(request, version=PROTOCOL_V1))
    assert challenge.version == state.version == PROTOCOL_V1
    with pytest.raises(errors.TmkVersionMismatch) as caught:
        session.receive_challenge(wire(challenge))
    assert caught.value.code == "tmk-version-mismatch"
    assert session.stage is TerminalStage.FAILED

    rnd1 = request.rnd1
    again = TerminalSession(terminal.scm, trust, clock=lambda: NOW, random=lambda _: rnd1)
    assert again.start() == request
    with pytest.raises(errors.TmkBadServerSignature):
        again.receive_challenge(wire(replace(challenge, version=PROTOCOL_V2)))
    assert not terminal.scm.has_tmk


def test_a_terminal_refuses_messages_in_another_version_than_it_speaks(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    # a version 1 terminal (old firmware) sent a version 2 challenge
    old = TerminalSession(terminal.scm, trust, clock=lambda: NOW, version=PROTOCOL_V1)
    challenge, _ = server.start(replace(old.start(), version=PROTOCOL_V2))
    with pytest.raises(errors.TmkVersionMismatch):
        old.receive_challenge(challenge)
    # a version 2 delivery stripped of its signature and relabelled version 1
    session, delivery, _ = _delivered(terminal, server, trust, PROTOCOL_V2)
    stripped = replace(delivery, signature=None, version=PROTOCOL_V1)
    with pytest.raises(errors.TmkVersionMismatch):
        session.receive_delivery(wire(stripped))
    assert not terminal.scm.has_tmk
    with pytest.raises(ValueError):
        TerminalSession(terminal.scm, trust, version=3)


def test_the_server_answers_in_the_requests_version_and_refuses_others_in_the_session(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    for version in (PROTOCOL_V1, PROTOCOL_V2):
        run = Run(TerminalSession(terminal.scm, trust, clock=lambda: NOW, version=version))
        run.request = run.session.start()
        run.challenge, run.state = server.start(run.request)
        run.proof = run.session.receive_challenge(wire(run.challenge))
        # a proof relabelled to the other version: refused, nothing made
        other = PROTOCOL_V1 if version == PROTOCOL_V2 else PROTOCOL_V2
        before = {k.handle for k in keystore.list()}
        with pytest.raises(errors.TmkVersionMismatch):
            server.accept(run.state, replace(run.proof, version=other))
        assert {k.handle for k in keystore.list()} == before
        run.delivery, run.state = server.accept(run.state, run.proof)
        run.confirmation = run.session.receive_delivery(wire(run.delivery))
        with pytest.raises(errors.TmkVersionMismatch):
            server.confirm(run.state, replace(run.confirmation, version=other))
        run.event, run.state = server.confirm(run.state, run.confirmation)
        assert {m.version for m in run.messages()} == {version}
        assert run.state.stage is ServerStage.ACTIVE
        assert (run.delivery.signature is not None) == (version == PROTOCOL_V2)


def test_a_v2_proof_does_not_verify_in_a_v1_session(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    """TBS2 names its version too: a proof signed for version 2 is no version 1 proof."""
    server = Server(keystore, work, terminal.registration)
    session = TerminalSession(terminal.scm, trust, clock=lambda: NOW, version=PROTOCOL_V1)
    challenge, state = server.start(session.start())
    proof = session.receive_challenge(challenge)
    v2_signature = terminal.scm.sign_terminal_proof(
        session_id=state.session_id, rnd1=state.rnd1, rnd2=state.rnd2, version=PROTOCOL_V2
    )
    with pytest.raises(errors.TmkBadTerminalProof):
        server.accept(state, replace(proof, signature=v2_signature))


def test_a_server_may_refuse_version_1(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey
) -> None:
    request = DownloadRequest(sn=SN, rnd1=bytes(32), suite="p256", version=PROTOCOL_V1)
    for versions in ({PROTOCOL_V2}, frozenset({PROTOCOL_V2})):
        with pytest.raises(errors.TmkUnsupportedVersion) as caught:
            server_start(
                request,
                terminal=terminal.registration,
                keystore=keystore,
                work_key=work.handle,
                kswcrt_der=work.der,
                ticket_key=ticket_key(keystore),
                now=NOW,
                versions=versions,
            )
        assert caught.value.code == "tmk-unsupported-version"
    challenge, _ = server_start(
        replace(request, version=PROTOCOL_V2),
        terminal=terminal.registration,
        keystore=keystore,
        work_key=work.handle,
        kswcrt_der=work.der,
        ticket_key=ticket_key(keystore),
        now=NOW,
        versions={PROTOCOL_V2},
    )
    assert challenge.version == PROTOCOL_V2


# =====================================================================================
# Order and single use
# =====================================================================================


def test_server_steps_out_of_order_are_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, proof, state = _proved(terminal, server, trust)
    fake_confirmation = Confirmation(session_id=state.session_id, mac=bytes(16))
    with pytest.raises(errors.TmkOutOfOrder) as caught:
        server.confirm(state, fake_confirmation)  # confirmation before delivery
    assert caught.value.code == "tmk-out-of-order"

    delivery, delivered = server.accept(state, proof)
    with pytest.raises(errors.TmkOutOfOrder):
        server.accept(delivered, proof)  # the proof again: sessions are single-use
    _, active = server.confirm(delivered, session.receive_delivery(delivery))
    with pytest.raises(errors.TmkOutOfOrder):
        server.accept(active, proof)
    with pytest.raises(errors.TmkOutOfOrder):
        server_abort(active, keystore=keystore)  # an active TMK is revoked, not aborted


def test_terminal_steps_out_of_order_are_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, delivery, _ = _delivered(terminal, server, trust)

    session = TerminalSession(terminal.scm, trust, clock=lambda: NOW)
    with pytest.raises(errors.TmkOutOfOrder):
        session.receive_delivery(delivery)  # before even starting
    challenge, _ = server.start(session.start())
    with pytest.raises(errors.TmkOutOfOrder):
        session.start()  # a session is started once
    with pytest.raises(errors.TmkOutOfOrder):
        session.receive_delivery(delivery)  # a delivery before the challenge
    session.receive_challenge(challenge)
    with pytest.raises(errors.TmkOutOfOrder):
        session.receive_challenge(challenge)  # the challenge twice


def test_a_failed_terminal_session_cannot_continue(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, challenge, _ = _started(terminal, server, trust)
    with pytest.raises(errors.TmkBadServerSignature):
        session.receive_challenge(replace(challenge, signature=flip(challenge.signature)))
    with pytest.raises(errors.TmkOutOfOrder):
        session.receive_challenge(challenge)  # the genuine one now comes too late


def test_aborting_a_challenged_session_ends_it(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, proof, state = _proved(terminal, server, trust)
    aborted = server_abort(state, keystore=keystore)
    with pytest.raises(errors.TmkOutOfOrder):
        server.accept(aborted, proof)


def test_sessions_get_fresh_ids_and_randoms(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    runs = [_started(terminal, server, trust) for _ in range(3)]
    assert len({c.session_id for _, c, _ in runs}) == 3
    assert len({c.rnd1 for _, c, _ in runs}) == 3
    assert len({c.rnd2 for _, c, _ in runs}) == 3
    assert all(c.expires_at == NOW + timedelta(seconds=60) for _, c, _ in runs)


def test_randomness_and_time_are_injectable(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey
) -> None:
    fixed = lambda n: bytes(range(n))  # noqa: E731
    request = DownloadRequest(sn=SN, rnd1=bytes(32), suite="p256")
    challenge, state = server_start(
        request,
        terminal=terminal.registration,
        keystore=keystore,
        work_key=work.handle,
        kswcrt_der=work.der,
        ticket_key=ticket_key(keystore),
        now=NOW,
        ttl=timedelta(seconds=5),
        random=fixed,
    )
    assert state.session_id == bytes(range(16)).hex()
    assert state.rnd2 == bytes(range(32))
    assert challenge.expires_at == NOW + timedelta(seconds=5)


# =====================================================================================
# Encodings
# =====================================================================================


def test_messages_round_trip_canonically(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, root: Ca
) -> None:
    intermediate = _make_intermediate(keystore, root, "ks-issuing")
    work = _make_work_key(keystore, intermediate, chain=(intermediate.cert,))
    run = download(
        terminal, Server(keystore, work, terminal.registration), ServerTrust((root.cert,))
    )
    for message in run.messages():
        encoded = message.to_json()
        assert type(message).from_json(encoded) == message
        assert parse_message(encoded) == message
        assert parse_message(encoded.decode()) == message
        # canonical: sorted keys, no whitespace, one encoding per message
        assert (
            encoded
            == json.dumps(json.loads(encoded), sort_keys=True, separators=(",", ":")).encode()
        )
    assert run.state is not None
    assert ServerSessionState.from_json(run.state.to_json()) == run.state


def _request_obj() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(DownloadRequest(sn=SN, rnd1=bytes(32), suite="p256").to_json())
    return obj


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


MALFORMED_REQUESTS: list[Any] = [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'{"type":"tmk-download-request","type":"x"}', id="duplicate-key"),
    pytest.param(_encode({**_request_obj(), "extra": 1}), id="unknown-field"),
    pytest.param(_encode({k: v for k, v in _request_obj().items() if k != "rnd1"}), id="missing"),
    pytest.param(_encode({**_request_obj(), "v": 1.0}), id="version-float"),
    pytest.param(_encode({**_request_obj(), "v": True}), id="version-bool"),
    pytest.param(_encode({**_request_obj(), "v": "1"}), id="version-string"),
    pytest.param(_encode({**_request_obj(), "type": "tmk-confirmation"}), id="wrong-type"),
    pytest.param(_encode({**_request_obj(), "sn": 123}), id="sn-number"),
    pytest.param(_encode({**_request_obj(), "sn": ""}), id="sn-empty"),
    pytest.param(_encode({**_request_obj(), "sn": "A" * 65}), id="sn-long"),
    pytest.param(_encode({**_request_obj(), "sn": "POS 1"}), id="sn-space"),
    pytest.param(_encode({**_request_obj(), "sn": "../etc"}), id="sn-path"),
    pytest.param(_encode({**_request_obj(), "suite": "P256"}), id="suite-case"),
    pytest.param(
        _encode({**_request_obj(), "rnd1": base64.b64encode(bytes(15)).decode()}), id="rnd1-short"
    ),
    pytest.param(
        _encode({**_request_obj(), "rnd1": base64.b64encode(bytes(65)).decode()}), id="rnd1-long"
    ),
    pytest.param(_encode({**_request_obj(), "rnd1": "%%%%"}), id="rnd1-not-base64"),
    pytest.param(
        _encode({**_request_obj(), "rnd1": base64.urlsafe_b64encode(b"\xfb" * 32).decode()}),
        id="rnd1-urlsafe",
    ),
    pytest.param(
        _encode({**_request_obj(), "rnd1": base64.b64encode(bytes(32)).decode().rstrip("=")}),
        id="rnd1-unpadded",
    ),
    pytest.param(
        _encode({**_request_obj(), "rnd1": base64.b64encode(bytes(32)).decode()[:-2] + "B="}),
        id="rnd1-noncanonical-bits",
    ),
    pytest.param(_encode({**_request_obj(), "rnd1": None}), id="rnd1-null"),
    pytest.param(_encode({**_request_obj(), "rnd1": ["AAAA"]}), id="rnd1-list"),
    pytest.param(
        b'{"type":"tmk-download-request","v":1,"sn":"A","suite":"p256","rnd1":NaN}', id="nan"
    ),
    pytest.param(b"{" * 100_000, id="oversized"),
    pytest.param(b'{"v":' + b"9" * 5000 + b"}", id="huge-integer"),
    pytest.param(b"[" * 5000 + b"]" * 5000, id="deeply-nested"),
]


@pytest.mark.parametrize("data", MALFORMED_REQUESTS)
def test_malformed_requests_raise_the_stable_malformed_error(data: bytes) -> None:
    with pytest.raises(errors.TmkMalformedMessage) as caught:
        DownloadRequest.from_json(data)
    assert caught.value.code == "tmk-malformed-message"
    with pytest.raises(errors.TmkMalformedMessage):
        parse_message(data)


@pytest.mark.parametrize("version", [0, 3, -1, 2**40])
def test_a_version_nobody_speaks_is_its_own_error(version: int) -> None:
    data = _encode({**_request_obj(), "v": version})
    for parse in (DownloadRequest.from_json, parse_message):
        with pytest.raises(errors.TmkUnsupportedVersion) as caught:
            parse(data)
        assert caught.value.code == "tmk-unsupported-version"
        assert isinstance(caught.value, errors.TmkMalformedMessage)  # a message not parsed


def test_each_version_parses_to_a_message_of_that_version() -> None:
    for version in (PROTOCOL_V1, PROTOCOL_V2):
        request = DownloadRequest.from_json(_encode({**_request_obj(), "v": version}))
        assert request.version == version
        assert json.loads(request.to_json())["v"] == version


def _challenge_obj() -> dict[str, Any]:
    challenge = ServerChallenge(
        session_id="a" * 32,
        rnd1=bytes(32),
        rnd2=bytes(32),
        kswcrt_der=b"\x30\x00",
        signature=b"\x01" * 64,
        expires_at=NOW,
        ticket=b"opaque",
    )
    obj: dict[str, Any] = json.loads(challenge.to_json())
    return obj


MALFORMED_CHALLENGES: list[Any] = [
    pytest.param({"session_id": "A" * 32}, id="session-id-uppercase"),
    pytest.param({"session_id": "a" * 31}, id="session-id-short"),
    pytest.param({"expires_at": "2025-06-01 12:00:00"}, id="time-format"),
    pytest.param({"expires_at": "2025-06-01T12:00:00+00:00"}, id="time-offset"),
    pytest.param({"expires_at": "2025-13-01T12:00:00Z"}, id="time-invalid"),
    pytest.param({"expires_at": 1748779200}, id="time-number"),
    pytest.param({"chain": "AAAA"}, id="chain-not-list"),
    pytest.param({"chain": ["MAA="] * 5}, id="chain-too-long"),
    pytest.param({"chain": [1]}, id="chain-item-number"),
    pytest.param({"signature": ""}, id="signature-empty"),
    pytest.param({"kswcrt": base64.b64encode(bytes(16385)).decode()}, id="cert-too-large"),
]


@pytest.mark.parametrize("change", MALFORMED_CHALLENGES)
def test_malformed_challenges_raise_the_stable_malformed_error(change: dict[str, Any]) -> None:
    with pytest.raises(errors.TmkMalformedMessage):
        ServerChallenge.from_json(_encode({**_challenge_obj(), **change}))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"algorithm": "aes-192"}, id="unknown-algorithm"),
        pytest.param({"algorithm": "rsa-2048"}, id="asymmetric-algorithm"),
        pytest.param({"algorithm": None}, id="null-algorithm"),
        pytest.param({"kcv": base64.b64encode(bytes(3)).decode()}, id="kcv-wrong-length"),
        pytest.param({"wrapped_tmk": ""}, id="wrapped-empty"),
    ],
)
def test_malformed_deliveries_raise_the_stable_malformed_error(change: dict[str, Any]) -> None:
    delivery = KeyDelivery(
        session_id="a" * 32, algorithm=KeyAlgorithm.AES_128, wrapped_tmk=b"x" * 48, kcv=bytes(5)
    )
    with pytest.raises(errors.TmkMalformedMessage):
        KeyDelivery.from_json(_encode({**json.loads(delivery.to_json()), **change}))


def test_a_delivery_carries_a_signature_from_version_2_on_and_only_then() -> None:
    v1 = KeyDelivery(
        session_id="a" * 32, algorithm=KeyAlgorithm.AES_128, wrapped_tmk=b"x" * 48, kcv=bytes(5)
    )
    v2 = replace(v1, signature=b"\x01" * 70, version=PROTOCOL_V2)
    assert "signature" not in json.loads(v1.to_json())
    assert KeyDelivery.from_json(v2.to_json()) == v2
    v1_obj, v2_obj = json.loads(v1.to_json()), json.loads(v2.to_json())
    for obj in (
        {**v1_obj, "signature": v2_obj["signature"]},  # version 1 has no such field
        {**v1_obj, "v": PROTOCOL_V2},  # version 2 without one
        {**v2_obj, "signature": ""},
        {**v2_obj, "signature": base64.b64encode(bytes(1025)).decode()},
    ):
        with pytest.raises(errors.TmkMalformedMessage):
            KeyDelivery.from_json(_encode(obj))
    with pytest.raises(errors.TmkMalformedMessage):
        replace(v1, version=PROTOCOL_V2)
    with pytest.raises(errors.TmkMalformedMessage):
        replace(v2, version=PROTOCOL_V1)


@pytest.mark.parametrize("mac_length", [0, 7, 17])
def test_confirmation_mac_length_is_checked(mac_length: int) -> None:
    obj = {"type": "tmk-confirmation", "v": 1, "session_id": "a" * 32}
    obj["mac"] = base64.b64encode(bytes(mac_length)).decode()
    with pytest.raises(errors.TmkMalformedMessage):
        Confirmation.from_json(_encode(obj))


def test_constructing_an_invalid_message_in_code_is_refused_too() -> None:
    with pytest.raises(errors.TmkMalformedMessage):
        DownloadRequest(sn=SN, rnd1=bytes(8), suite="p256")
    with pytest.raises(errors.TmkMalformedMessage):
        ServerChallenge(
            session_id="a" * 32,
            rnd1=bytes(32),
            rnd2=bytes(32),
            kswcrt_der=b"\x30\x00",
            signature=b"\x01",
            expires_at=datetime(2025, 1, 1, 12, 0, 0, 500, tzinfo=UTC),  # sub-second
            ticket=b"opaque",
        )


def test_error_messages_do_not_echo_long_peer_input() -> None:
    obj = {**_request_obj(), "x" * 5000: 1, "y" * 5000: 2}
    with pytest.raises(errors.TmkMalformedMessage) as caught:
        DownloadRequest.from_json(_encode(obj))
    assert len(caught.value.message) < 200


def test_parse_message_rejects_unknown_types() -> None:
    with pytest.raises(errors.TmkMalformedMessage):
        parse_message(b'{"type":"tmk-key-request","v":1}')
    with pytest.raises(errors.TmkMalformedMessage):
        parse_message(b'{"v":1}')


@pytest.mark.parametrize(
    "text",
    [
        b"{}",
        b'{"session_id": "x"}',
        b"null",
        b"garbage",
    ],
)
def test_a_corrupt_persisted_state_is_refused(text: bytes) -> None:
    with pytest.raises(errors.TmkMalformedMessage):
        ServerSessionState.from_json(text)


def test_a_persisted_state_with_a_bad_stage_is_refused(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    _, _, state = _started(terminal, Server(keystore, work, terminal.registration), trust)
    obj = json.loads(state.to_json())
    bad = [
        ("stage", "won"),
        ("stage", "delivered"),  # a delivered session without a TMK handle
        ("rnd1", "AA=="),
        ("session_id", 5),
        ("tmk_handle", 3),
        ("expires_at", "soon"),
    ]
    for key, value in bad:
        with pytest.raises(errors.TmkMalformedMessage):
            ServerSessionState.from_json(_encode({**obj, key: value}))


def test_naive_times_are_a_programming_error(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, proof, state = _proved(terminal, server, trust)
    with pytest.raises(ValueError, match="timezone-aware"):
        server.accept(state, proof, now=NOW.replace(tzinfo=None))


def test_error_codes_are_distinct_and_stable() -> None:
    expected = {
        errors.TmkMalformedMessage: "tmk-malformed-message",
        errors.TmkOutOfOrder: "tmk-out-of-order",
        errors.TmkSessionExpired: "tmk-session-expired",
        errors.TmkReplay: "tmk-replay",
        errors.TmkUnsupportedSuite: "tmk-unsupported-suite",
        errors.TmkUntrustedServerCertificate: "tmk-untrusted-server-certificate",
        errors.TmkRevokedServerCertificate: "tmk-revoked-server-certificate",
        errors.TmkBadServerSignature: "tmk-bad-server-signature",
        errors.TmkBadTerminalProof: "tmk-bad-terminal-proof",
        errors.TmkUnwrapFailed: "tmk-unwrap-failed",
        errors.TmkKcvMismatch: "tmk-kcv-mismatch",
        errors.TmkBadConfirmation: "tmk-bad-confirmation",
        errors.ScmError: "tmk-scm-error",
        errors.ScmUnreadable: "tmk-scm-unreadable",
        errors.ScmNoTmk: "tmk-scm-no-tmk",
        errors.ScmExists: "tmk-scm-exists",
    }
    for cls, code in expected.items():
        assert cls.code == code
        assert issubclass(cls, errors.TmkError)
    assert len(set(expected.values())) == len(expected)


# =====================================================================================
# Session tickets: the challenged state travels with the terminal
# =====================================================================================


def test_a_ticket_carries_the_challenged_state_and_only_its_sealer_opens_it(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    _, challenge, state = _started(terminal, server, trust)
    assert server.open(challenge.ticket) == state
    for position in (0, 3, len(challenge.ticket) // 2, len(challenge.ticket) - 1):
        altered = bytearray(challenge.ticket)
        altered[position] ^= 0x01
        with pytest.raises(errors.TmkInvalidTicket):
            server.open(bytes(altered))
    for cut in (b"", challenge.ticket[:37], challenge.ticket[:-1]):
        with pytest.raises(errors.TmkInvalidTicket):
            server.open(cut)
    other_server = Server(keystore, work, terminal.registration)  # same key id, other key
    with pytest.raises(errors.TmkInvalidTicket):
        other_server.open(challenge.ticket)
    with pytest.raises(errors.TmkInvalidTicket):  # a key that no longer seals tickets
        open_ticket(challenge.ticket, keystore=keystore, key_for=lambda _: None)


def test_a_ticket_answers_only_a_challenged_state(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    run = download(terminal, server, trust)
    assert run.state is not None and run.state.stage is ServerStage.ACTIVE
    with pytest.raises(ValueError, match="challenged"):
        seal_ticket(run.state, keystore=keystore, key=server.ticket_key)


def test_a_ticket_holds_no_secret_and_expires_with_its_session(
    terminal: Terminal, keystore: SoftKeyStore, work: WorkKey, trust: ServerTrust
) -> None:
    server = Server(keystore, work, terminal.registration)
    session, challenge, state = _started(terminal, server, trust)
    sealed_state = json.loads(challenge.ticket[5:-32])
    assert sealed_state["stage"] == "challenged" and sealed_state["sn"] == terminal.scm.sn
    assert sealed_state["tmk_handle"] is None  # randoms, SN and times only
    proof = session.receive_challenge(challenge)
    assert proof.ticket == challenge.ticket
    with pytest.raises(errors.TmkSessionExpired):
        server.accept(server.open(proof.ticket), proof, now=state.expires_at)
