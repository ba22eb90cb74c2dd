"""The published test vectors of the TMK download: ``docs/tmk-vectors/<suite>-<tmk>.json``
for protocol version 1 and ``<suite>-<tmk>-v2.json`` for version 2.

Each vector is one whole download with fixed keys, randoms and times, and the exact bytes
of every message and of everything signed, bound, wrapped and MACed on the way, so that a
terminal vendor can unit-test firmware without a key server (docs/tmk-protocol.md, "Test
vectors"). They are made here by the protocol's own code: both roles of
:mod:`trustfleet.tmk.protocol` run as they do in production, and only what draws
randomness is replaced:

- randoms (rnd1, rnd2, the session id), the TMK, the SM4 content key, SM2's ephemeral k of
  encryption and of the terminal's signature are drawn from fixed values;
- ECDSA signatures (the work key's, a P-256 terminal's) are RFC 6979 deterministic ECDSA;
- the key server's KSRCRT and KSWCRT are made by the PKI's certificate profiles from
  fixed keys, serials and times.

What cannot be fixed through pyca/cryptography stays random: the ephemeral key of HPKE
(a P-256 terminal's ``wrapped_tmk``), the seed of RSA-OAEP (an RSA terminal's
``wrapped_tmk``) and the salt of RSA-PSS (an RSA terminal's proof); in version 2 also what
covers a random ``wrapped_tmk``: TBS3 and the work key's signature over it. Each vector
lists these under ``randomised``; :func:`check` replays the recorded bytes through the
code (the server verifies the recorded proof, the terminal verifies and opens the recorded
delivery and must produce the recorded confirmation), and :func:`differences` compares
everything else byte for byte. RSA terminal keys cannot be derived from a seed either:
they are read back from the existing vector files.

``python -m trustfleet.tmk.vectors [--write [--force]] [DIR]`` checks the files (and
writes those that are missing or out of date; with ``--force``, all of them).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from trustfleet.crypto import (
    algorithm_of,
    load_private_key,
    private_key_to_der,
    public_key_to_der,
    suite_for_algorithm,
)
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.crypto.gm import GM
from trustfleet.crypto.payment import kcv as kcv_module
from trustfleet.crypto.sm2 import DEFAULT_UID, POINT_SIZE, SM2P256V1, SM3_SIZE, SM2PrivateKey
from trustfleet.errors import CryptoError, UnsupportedAlgorithm
from trustfleet.keystore import secret_ops
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage
from trustfleet.pki import x509 as px
from trustfleet.pki.service import ROOT_VALIDITY, SERVER_VALIDITY
from trustfleet.tmk.errors import TmkError, TmkKcvMismatch, TmkUnwrapFailed
from trustfleet.tmk.identity import KSRCRT_CA, WORK_CERT_NAME
from trustfleet.tmk.protocol import (
    DEFAULT_RANDOM_SIZE,
    DEFAULT_SESSION_TTL,
    PROTOCOL_V1,
    PROTOCOL_V2,
    Confirmation,
    DownloadRequest,
    KeyDelivery,
    RegisteredTerminal,
    ServerChallenge,
    ServerTrust,
    TerminalProof,
    TerminalSession,
    TicketKey,
    confirmation_data,
    key_delivery_tbs,
    open_ticket,
    server_accept_proof,
    server_auth_tbs,
    server_confirm,
    server_start,
    suite_for_terminal_key,
    terminal_auth_tbs,
    transport_info,
)
from trustfleet.wire import format_time, transcript

FORMAT = "trustfleet-tmk-vector-v1"
#: the terminal key algorithms vectors are published for, by the name in the file name
TERMINAL_KEYS = {
    "p256": KeyAlgorithm.EC_P256,
    "rsa-2048": KeyAlgorithm.RSA_2048,
    "rsa-3072": KeyAlgorithm.RSA_3072,
    "sm2": KeyAlgorithm.SM2,
}
TMK_ALGORITHMS = (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES)
#: the protocol versions vectors are published for, by the suffix of the file name
VERSION_SUFFIXES = {PROTOCOL_V1: "", PROTOCOL_V2: "-v2"}
NAMES = tuple(
    f"{key}-{tmk.value}{suffix}"
    for suffix in VERSION_SUFFIXES.values()
    for key in TERMINAL_KEYS
    for tmk in TMK_ALGORITHMS
)
DEFAULT_DIRECTORY = Path("docs/tmk-vectors")

SERVER_NOW = datetime(2026, 3, 2, 9, 30, 0, tzinfo=UTC)
PROOF_AT = SERVER_NOW + timedelta(seconds=1)
TERMINAL_CLOCK = SERVER_NOW + timedelta(seconds=2)
CONFIRM_AT = SERVER_NOW + timedelta(seconds=3)
CERTIFICATES_FROM = datetime(2026, 1, 1, tzinfo=UTC)
TICKET_KEY_ID = 1
_TMK_LENGTHS = {KeyAlgorithm.AES_128: 16, KeyAlgorithm.AES_256: 32, KeyAlgorithm.TDES: 16}
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_DETERMINISTIC_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_HPKE_ENC_SIZE = 65

#: fields whose bytes come out different on every run, and how a reader checks them
_RANDOMISED = {
    KeyAlgorithm.EC_P256: {
        "messages.key_delivery": "its wrapped_tmk is random (see intermediates.wrapped_tmk)",
        "intermediates.wrapped_tmk": "HPKE enc || ciphertext: the sender's ephemeral key is"
        " random; decrypt it with the terminal's key and info, and compare the TMK",
        "intermediates.hpke_enc": "the HPKE ephemeral public key (random)",
        "intermediates.hpke_ciphertext": "AES-128-GCM under the HPKE key schedule of the"
        " ephemeral key (random)",
    },
    KeyAlgorithm.RSA_2048: {
        "messages.terminal_proof": "its signature is random (see intermediates.terminal_signature)",
        "intermediates.terminal_signature": "RSA-PSS draws a random 32-byte salt: verify it"
        " with the terminal's public key",
        "messages.key_delivery": "its wrapped_tmk is random (see intermediates.wrapped_tmk)",
        "intermediates.wrapped_tmk": "RSA-OAEP draws a random seed: decrypt it with the"
        " terminal's key and the label, and compare the TMK",
    },
    KeyAlgorithm.SM2: {},
}
_RANDOMISED[KeyAlgorithm.RSA_3072] = _RANDOMISED[KeyAlgorithm.RSA_2048]
#: version 2 signs the delivery: where wrapped_tmk is random, so are TBS3 and its signature
_RANDOMISED_V2 = {
    "messages.key_delivery": "its wrapped_tmk is random, and so its signature over TBS3"
    " (see intermediates.wrapped_tmk, tbs3 and delivery_signature)",
    "intermediates.tbs3": "it covers the random wrapped_tmk: build it from the delivery",
    "intermediates.delivery_signature": "the work key's signature over tbs3 (which covers"
    " the random wrapped_tmk): verify it with KSWCRT's key; a DER ECDSA signature's length"
    " varies",
}
#: inside a randomised message, the fields that make it so, and whether each keeps its
#: length (a DER ECDSA signature does not)
_RANDOM_MESSAGE_FIELDS = {
    "messages.key_delivery": {"wrapped_tmk": True, "signature": False},
    "messages.terminal_proof": {"signature": True},
}
#: randomised values whose length varies from run to run
_VARIABLE_LENGTH = frozenset({"intermediates.delivery_signature"})


def _randomised(key_algorithm: KeyAlgorithm, version: int) -> dict[str, str]:
    randomised = dict(_RANDOMISED[key_algorithm])
    if version >= PROTOCOL_V2 and "messages.key_delivery" in randomised:
        randomised.update(_RANDOMISED_V2)
    return randomised


class VectorMismatch(Exception):
    """A vector does not match what the code does."""


def split_name(name: str) -> tuple[str, KeyAlgorithm, int]:
    """A vector's terminal key name, TMK algorithm and protocol version: ``rsa-2048-tdes``
    is (``rsa-2048``, TDES, 1), ``p256-aes-128-v2`` (``p256``, AES-128, 2)."""
    for version, suffix in sorted(VERSION_SUFFIXES.items(), reverse=True):
        unversioned = name.removesuffix(suffix) if suffix else name
        if suffix and unversioned == name:
            continue
        for algorithm in TMK_ALGORITHMS:
            key_name = unversioned.removesuffix(f"-{algorithm.value}")
            if key_name != unversioned and key_name in TERMINAL_KEYS:
                return key_name, algorithm, version
    raise VectorMismatch(f"{name!r} names no test vector")


def _derive(label: str, size: int) -> bytes:
    """Fixed bytes named by ``label`` (SHA-256 in counter mode over a label)."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"TF-TMK test vector {counter} {label}".encode()).digest()
        counter += 1
    return out[:size]


def _scalar(label: str, order: int) -> int:
    return int.from_bytes(_derive(label, 48), "big") % (order - 1) + 1


def _p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(_scalar(label, _P256_ORDER), ec.SECP256R1())


def _tmk(name: str, algorithm: KeyAlgorithm) -> bytes:
    key = _derive(f"{name} tmk", _TMK_LENGTHS[algorithm])
    if algorithm is KeyAlgorithm.TDES and key[:8] == key[8:16]:  # pragma: no cover
        raise ValueError("a degenerate TDES key")
    return key


def _serial(label: str) -> int:
    return int.from_bytes(_derive(label, 16), "big") >> 1 | 1


def default_terminal_key(key_name: str) -> PrivateKey:
    """The terminal key of a new vector: derived for P-256 and SM2, fresh for RSA (which
    cannot be derived from a seed; existing files keep theirs)."""
    algorithm = TERMINAL_KEYS[key_name]
    if algorithm is KeyAlgorithm.EC_P256:
        return _p256_key(f"{key_name} terminal key")
    if algorithm is KeyAlgorithm.SM2:
        return SM2PrivateKey(_scalar(f"{key_name} terminal key", SM2P256V1.n))
    bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


# =====================================================================================
# The key server's identity, deterministic
# =====================================================================================


@dataclass(frozen=True)
class _Identity:
    root: x509.Certificate
    kswcrt: x509.Certificate
    work_key: ec.EllipticCurvePrivateKey


def _identity() -> _Identity:
    """KSRCRT and KSWCRT as :mod:`trustfleet.tmk.identity` makes them (the PKI's root and
    server profiles), from fixed keys, serials and times, signed with RFC 6979 ECDSA."""
    root_key = _p256_key("ksrcrt key")
    work_key = _p256_key("work key")

    def sign_with(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
        return lambda data: key.sign(data, _DETERMINISTIC_ECDSA)

    root_public = root_key.public_key()
    profile = px.ca_profile(
        px.CertificateKind.ROOT,
        KSRCRT_CA,
        root_public,
        path_length=0,
        not_before=CERTIFICATES_FROM,
        not_after=CERTIFICATES_FROM + ROOT_VALIDITY,
    )
    root_issuer = px.self_issuer(
        profile.subject, root_public, KeyAlgorithm.EC_P256, sign_with(root_key)
    )
    root = px.issue_certificate(profile, root_issuer, _serial("ksrcrt serial"))
    work_profile = px.server_profile(
        work_key.public_key(),
        [WORK_CERT_NAME],
        [],
        not_before=CERTIFICATES_FROM,
        not_after=CERTIFICATES_FROM + SERVER_VALIDITY,
    )
    issuer = px.issuer_from_certificate(root, KeyAlgorithm.EC_P256, sign_with(root_key))
    kswcrt = px.issue_certificate(work_profile, issuer, _serial("kswcrt serial"))
    return _Identity(root, kswcrt, work_key)


# =====================================================================================
# A key store and a terminal module with fixed randomness
# =====================================================================================


def _fixed_k(k: int) -> Callable[[int], int]:
    return lambda _bits: k


@dataclass
class _VectorKeyStore(KeyStore):
    """The key server's key store in a vector: the work key, the ticket key and the one
    TMK the download generates, in memory. What the download calls behaves as the soft
    store does, with the randomness fixed; everything else is refused."""

    work_key: ec.EllipticCurvePrivateKey
    ticket_key: bytes
    tmk: bytes
    tmk_algorithm: KeyAlgorithm
    sm4_key: bytes
    sm2_encryption_k: int
    generated: list[str] = field(default_factory=list)
    backend = "test-vector"

    WORK = "vector:work-key"
    TICKET = "vector:ticket-key"
    TMK = "vector:tmk"

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        if algorithm is not self.tmk_algorithm or self.generated:
            raise UnsupportedAlgorithm("a test vector generates one TMK")
        self.generated.append(self.TMK)
        return self.info(self.TMK)

    def info(self, handle: str) -> KeyInfo:
        algorithm = {
            self.WORK: KeyAlgorithm.EC_P256,
            self.TICKET: KeyAlgorithm.HMAC_SHA256,
            self.TMK: self.tmk_algorithm,
        }[handle]
        return KeyInfo(handle, algorithm, KeyUsage.NONE, False, "", self.backend, SERVER_NOW)

    def list(self) -> list[KeyInfo]:
        return [self.info(h) for h in (self.WORK, self.TICKET, *self.generated)]

    def public_key(self, handle: str) -> PublicKey:
        if handle != self.WORK:
            raise UnsupportedAlgorithm("only the work key has a public key here")
        return self.work_key.public_key()

    def sign(self, handle: str, data: bytes) -> bytes:
        if handle != self.WORK:
            raise UnsupportedAlgorithm("only the work key signs")
        return self.work_key.sign(data, _DETERMINISTIC_ECDSA)

    def wrap(self, handle: str, *, under: str | PublicKey, info: bytes = b"") -> bytes:
        if handle != self.TMK or isinstance(under, str):
            raise UnsupportedAlgorithm("a test vector wraps its TMK to the terminal only")
        if algorithm_of(under) is KeyAlgorithm.SM2:
            return GM.kem_wrap(
                under,
                self.tmk,
                info,
                _content_key=self.sm4_key,
                _rnd_fn=_fixed_k(self.sm2_encryption_k),
            )
        return suite_for_algorithm(algorithm_of(under)).kem_wrap(under, self.tmk, info)

    def kcv(self, handle: str) -> bytes:
        return kcv_module.kcv(self.tmk_algorithm, self._secret(handle))

    def mac(self, handle: str, data: bytes) -> bytes:
        algorithm = KeyAlgorithm.HMAC_SHA256 if handle == self.TICKET else self.tmk_algorithm
        return secret_ops.mac(algorithm, self._secret(handle), data)

    def destroy(self, handle: str) -> None:
        if handle in self.generated:
            self.generated.remove(handle)

    def _secret(self, handle: str) -> bytes:
        if handle == self.TICKET:
            return self.ticket_key
        if handle == self.TMK and self.generated:
            return self.tmk
        raise UnsupportedAlgorithm(f"no secret key {handle}")

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise UnsupportedAlgorithm("not part of a TMK download")

    import_key = decrypt = encrypt = unwrap = derive = export = _refuse


class _VectorTerminal:
    """The terminal's key module in a vector (:class:`~trustfleet.tmk.protocol.
    TerminalKeyModule`): what the reference SCM does, with the key given and the
    signature made deterministic where the scheme allows it (RFC 6979 ECDSA, SM2 with a
    fixed k; RSA-PSS draws its salt)."""

    def __init__(self, sn: str, key: PrivateKey, sm2_signature_k: int) -> None:
        self._sn = sn
        self._key = key
        self._sm2_k = sm2_signature_k
        self.tmk: bytes | None = None
        self.tmk_algorithm: KeyAlgorithm | None = None

    @property
    def sn(self) -> str:
        return self._sn

    @property
    def suite(self) -> str:
        return suite_for_terminal_key(self._key.public_key()).name

    def sign_terminal_proof(
        self, *, session_id: str, rnd1: bytes, rnd2: bytes, version: int
    ) -> bytes:
        tbs = terminal_auth_tbs(
            sn=self._sn,
            suite=self.suite,
            session_id=session_id,
            rnd1=rnd1,
            rnd2=rnd2,
            version=version,
        )
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(tbs, _DETERMINISTIC_ECDSA)
        if isinstance(key, SM2PrivateKey):
            return key.sign(tbs, _rnd_fn=_fixed_k(self._sm2_k))
        return suite_for_algorithm(algorithm_of(key)).sign(key, tbs)

    def install_tmk(
        self,
        *,
        session_id: str,
        rnd1: bytes,
        rnd2: bytes,
        algorithm: KeyAlgorithm,
        wrapped_tmk: bytes,
        kcv: bytes,
        version: int,
    ) -> None:
        suite = suite_for_terminal_key(self._key.public_key())
        info = transport_info(
            suite,
            sn=self._sn,
            session_id=session_id,
            rnd1=rnd1,
            rnd2=rnd2,
            algorithm=algorithm,
            version=version,
        )
        try:
            key = suite.kem_unwrap(self._key, wrapped_tmk, info)
        except CryptoError:
            raise TmkUnwrapFailed() from None
        if len(key) != _TMK_LENGTHS[algorithm]:
            raise TmkUnwrapFailed("the delivered key has the wrong length for its algorithm")
        if not hmac.compare_digest(kcv_module.kcv(algorithm, key), kcv):
            raise TmkKcvMismatch()
        self.tmk, self.tmk_algorithm = key, algorithm

    def confirmation_mac(self, *, session_id: str, kcv: bytes, version: int) -> bytes:
        assert self.tmk is not None and self.tmk_algorithm is not None
        data = confirmation_data(session_id=session_id, kcv=kcv, version=version)
        return secret_ops.mac(self.tmk_algorithm, self.tmk, data)


class _Draws:
    """A random source that hands out fixed values in order (each of the size asked)."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, size: int) -> bytes:
        value = self._values.pop(0)
        if len(value) != size:
            raise ValueError(f"a draw of {size} bytes, but the next fixed value has {len(value)}")
        return value


# =====================================================================================
# Generating and checking
# =====================================================================================


@dataclass(frozen=True)
class _Setup:
    """Everything fixed about one vector."""

    name: str
    sn: str
    key_algorithm: KeyAlgorithm
    tmk_algorithm: KeyAlgorithm
    version: int
    terminal_key: PrivateKey
    identity: _Identity
    rnd1: bytes
    rnd2: bytes
    session_random: bytes
    ticket_key: bytes
    tmk: bytes
    sm4_key: bytes
    sm2_encryption_k: int
    sm2_signature_k: int

    @classmethod
    def of(cls, name: str, terminal_key: PrivateKey) -> _Setup:
        key_name, tmk_algorithm, version = split_name(name)
        key_algorithm = TERMINAL_KEYS[key_name]
        if algorithm_of(terminal_key) is not key_algorithm:
            raise VectorMismatch(f"{name}: the terminal key is not {key_algorithm.value}")
        return cls(
            name=name,
            sn=f"TFVEC-{name.upper()}",
            key_algorithm=key_algorithm,
            tmk_algorithm=tmk_algorithm,
            version=version,
            terminal_key=terminal_key,
            identity=_identity(),
            rnd1=_derive(f"{name} rnd1", DEFAULT_RANDOM_SIZE),
            rnd2=_derive(f"{name} rnd2", DEFAULT_RANDOM_SIZE),
            session_random=_derive(f"{name} session id", 16),
            ticket_key=_derive("ticket key", 32),
            tmk=_tmk(name, tmk_algorithm),
            sm4_key=_derive(f"{name} sm4 content key", 16),
            sm2_encryption_k=_scalar(f"{name} sm2 encryption k", SM2P256V1.n),
            sm2_signature_k=_scalar(f"{name} sm2 signature k", SM2P256V1.n),
        )

    def keystore(self) -> _VectorKeyStore:
        return _VectorKeyStore(
            work_key=self.identity.work_key,
            ticket_key=self.ticket_key,
            tmk=self.tmk,
            tmk_algorithm=self.tmk_algorithm,
            sm4_key=self.sm4_key,
            sm2_encryption_k=self.sm2_encryption_k,
        )

    def terminal(self) -> tuple[TerminalSession, _VectorTerminal]:
        module = _VectorTerminal(self.sn, self.terminal_key, self.sm2_signature_k)
        trust = ServerTrust((self.identity.root,))
        session = TerminalSession(
            module,
            trust,
            clock=lambda: TERMINAL_CLOCK,
            random=_Draws(self.rnd1),
            version=self.version,
        )
        return session, module

    def registration(self) -> RegisteredTerminal:
        return RegisteredTerminal(sn=self.sn, auth_public=self.terminal_key.public_key())

    def ticket_key_for(self, key_id: int) -> str | None:
        return _VectorKeyStore.TICKET if key_id == TICKET_KEY_ID else None


def _hex(value: bytes) -> str:
    return value.hex()


def generate(name: str, terminal_key: PrivateKey) -> dict[str, Any]:
    """One vector: a whole download run by the protocol's code with fixed inputs."""
    setup = _Setup.of(name, terminal_key)
    keystore = setup.keystore()
    session, module = setup.terminal()
    identity = setup.identity
    kswcrt_der = identity.kswcrt.public_bytes(Encoding.DER)

    request = session.start()
    challenge, state = server_start(
        request,
        terminal=setup.registration(),
        keystore=keystore,
        work_key=_VectorKeyStore.WORK,
        kswcrt_der=kswcrt_der,
        ticket_key=TicketKey(TICKET_KEY_ID, _VectorKeyStore.TICKET),
        now=SERVER_NOW,
        ttl=DEFAULT_SESSION_TTL,
        random=_Draws(setup.session_random, setup.rnd2),
    )
    proof = session.receive_challenge(challenge)
    opened = open_ticket(proof.ticket, keystore=keystore, key_for=setup.ticket_key_for)
    delivery, delivered = server_accept_proof(
        opened,
        proof,
        terminal=setup.registration(),
        keystore=keystore,
        now=PROOF_AT,
        tmk_algorithm=setup.tmk_algorithm,
        work_key=_VectorKeyStore.WORK,
    )
    confirmation = session.receive_delivery(delivery)
    server_confirm(delivered, confirmation, keystore=keystore, now=CONFIRM_AT)
    if module.tmk != setup.tmk:
        raise VectorMismatch(f"{name}: the terminal installed another TMK than the server's")

    suite = suite_for_terminal_key(setup.terminal_key.public_key())
    sn, session_id, rnd1, rnd2 = setup.sn, state.session_id, setup.rnd1, setup.rnd2
    version = setup.version
    info_input = transcript(
        f"TF-TMK-v{version} tmk-transport".encode(),
        sn.encode(),
        suite.name.encode(),
        session_id.encode(),
        rnd1,
        rnd2,
        setup.tmk_algorithm.value.encode(),
    )
    info = transport_info(
        suite,
        sn=sn,
        session_id=session_id,
        rnd1=rnd1,
        rnd2=rnd2,
        algorithm=setup.tmk_algorithm,
        version=version,
    )
    if suite.hash(info_input) != info:
        raise VectorMismatch(f"{name}: the transport info is not the hash of its fields")
    tbs1 = server_auth_tbs(
        sn=sn,
        suite=suite.name,
        session_id=session_id,
        rnd1=rnd1,
        rnd2=rnd2,
        expires_at=state.expires_at,
        version=version,
    )
    tbs2 = terminal_auth_tbs(
        sn=sn, suite=suite.name, session_id=session_id, rnd1=rnd1, rnd2=rnd2, version=version
    )
    conf = confirmation_data(session_id=session_id, kcv=delivery.kcv, version=version)
    wrapped = delivery.wrapped_tmk
    intermediates: dict[str, str] = {
        "kswcrt": _hex(kswcrt_der),
        "tbs1": _hex(tbs1),
        "server_signature": _hex(challenge.signature),
        "ticket": _hex(challenge.ticket),
        "tbs2": _hex(tbs2),
        "terminal_signature": _hex(proof.signature),
        "transport_info_input": _hex(info_input),
        "transport_info": _hex(info),
        "tmk": _hex(setup.tmk),
        "kcv": _hex(delivery.kcv),
        "wrapped_tmk": _hex(wrapped),
        **_transport_parts(setup, wrapped),
        **_delivery_signature(setup, session_id, delivery),
        "confirmation_data": _hex(conf),
        "confirmation_mac": _hex(confirmation.mac),
    }
    return {
        "format": FORMAT,
        "name": name,
        "description": (
            "One TMK download with fixed keys and randoms: the exact bytes of every message"
            " and intermediate value. docs/tmk-protocol.md, 'Test vectors', says how to use"
            " it; fields under 'randomised' differ on every run and are checked by"
            " verifying or decrypting them."
        ),
        "protocol_version": version,
        "suite": suite.name,
        "terminal_key_algorithm": setup.key_algorithm.value,
        "tmk_algorithm": setup.tmk_algorithm.value,
        "randomised": _randomised(setup.key_algorithm, version),
        "terminal": {
            "sn": setup.sn,
            "private_key_pkcs8": _hex(private_key_to_der(setup.terminal_key)),
            "public_key_spki": _hex(public_key_to_der(setup.terminal_key.public_key())),
            "ksrcrt": _hex(identity.root.public_bytes(Encoding.DER)),
            "clock": format_time(TERMINAL_CLOCK),
            "rnd1": _hex(setup.rnd1),
            **_terminal_sm2(setup),
        },
        "server": {
            "now": format_time(SERVER_NOW),
            "session_id_random": _hex(setup.session_random),
            "rnd2": _hex(setup.rnd2),
            "work_key_pkcs8": _hex(private_key_to_der(identity.work_key)),
            "ticket_key_id": TICKET_KEY_ID,
            "ticket_key": _hex(setup.ticket_key),
            "tmk": _hex(setup.tmk),
            **_server_sm2(setup),
        },
        "messages": {
            "download_request": request.to_json().decode(),
            "server_challenge": challenge.to_json().decode(),
            "terminal_proof": proof.to_json().decode(),
            "key_delivery": delivery.to_json().decode(),
            "confirmation": confirmation.to_json().decode(),
        },
        "intermediates": intermediates,
    }


def _delivery_tbs(setup: _Setup, session_id: str, delivery: KeyDelivery) -> bytes:
    return key_delivery_tbs(
        sn=setup.sn,
        suite=suite_for_terminal_key(setup.terminal_key.public_key()).name,
        session_id=session_id,
        rnd1=setup.rnd1,
        rnd2=setup.rnd2,
        algorithm=delivery.algorithm,
        wrapped_tmk=delivery.wrapped_tmk,
        kcv=delivery.kcv,
        version=setup.version,
    )


def _delivery_signature(setup: _Setup, session_id: str, delivery: KeyDelivery) -> dict[str, str]:
    """Version 2 on: TBS3 and the work key's signature over it."""
    if delivery.signature is None:
        return {}
    tbs3 = _delivery_tbs(setup, session_id, delivery)
    return {"tbs3": _hex(tbs3), "delivery_signature": _hex(delivery.signature)}


def _terminal_sm2(setup: _Setup) -> dict[str, str]:
    if setup.key_algorithm is not KeyAlgorithm.SM2:
        return {}
    k = setup.sm2_signature_k.to_bytes(32, "big")
    return {"sm2_user_id": _hex(DEFAULT_UID), "sm2_signature_k": _hex(k)}


def _server_sm2(setup: _Setup) -> dict[str, str]:
    if setup.key_algorithm is not KeyAlgorithm.SM2:
        return {}
    k = setup.sm2_encryption_k.to_bytes(32, "big")
    return {"sm4_content_key": _hex(setup.sm4_key), "sm2_encryption_k": _hex(k)}


def _transport_parts(setup: _Setup, wrapped: bytes) -> dict[str, str]:
    """``wrapped_tmk`` cut into its parts, per suite."""
    if setup.key_algorithm is KeyAlgorithm.EC_P256:
        return {
            "hpke_enc": _hex(wrapped[:_HPKE_ENC_SIZE]),
            "hpke_ciphertext": _hex(wrapped[_HPKE_ENC_SIZE:]),
        }
    if setup.key_algorithm is KeyAlgorithm.SM2:
        sm2_end = POINT_SIZE + SM3_SIZE + 16
        return {
            "sm2_c1": _hex(wrapped[:POINT_SIZE]),
            "sm2_c3": _hex(wrapped[POINT_SIZE : POINT_SIZE + SM3_SIZE]),
            "sm2_c2": _hex(wrapped[POINT_SIZE + SM3_SIZE : sm2_end]),
            "sm4_gcm_nonce": _hex(bytes(12)),
            "sm4_gcm_ciphertext": _hex(wrapped[sm2_end:]),
        }
    return {}


def terminal_key_of(vector: dict[str, Any]) -> PrivateKey:
    """The terminal's private key a vector holds."""
    return load_private_key(bytes.fromhex(vector["terminal"]["private_key_pkcs8"]))


def _flatten(vector: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in vector.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "randomised":
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def differences(recorded: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The fields of ``recorded`` that the code no longer makes: every field byte for byte,
    except the randomised ones, which must keep their length (and, inside a message,
    every other field of it)."""
    randomised = recorded.get("randomised", {})
    mine, theirs = dict(_flatten(recorded)), dict(_flatten(fresh))
    found = [f"{path}: missing" for path in sorted(set(theirs) - set(mine))]
    found += [f"{path}: not made any more" for path in sorted(set(mine) - set(theirs))]
    for path in sorted(set(mine) & set(theirs)):
        old, new = mine[path], theirs[path]
        if path in randomised:
            random_fields = _RANDOM_MESSAGE_FIELDS.get(path)
            if random_fields is not None:
                old_fields, new_fields = json.loads(old), json.loads(new)
                same = True
                for field_name, keeps_length in random_fields.items():
                    was, now = old_fields.pop(field_name, ""), new_fields.pop(field_name, "")
                    same = same and (not keeps_length or len(was) == len(now))
                if not same or old_fields != new_fields:
                    names = "/".join(f for f in random_fields if f in json.loads(old))
                    found.append(f"{path}: differs beyond its random {names}")
            elif path not in _VARIABLE_LENGTH and len(old) != len(new):
                found.append(f"{path}: {len(old) // 2} bytes, now {len(new) // 2}")
        elif old != new:
            found.append(f"{path}: differs")
    return found


def check(vector: dict[str, Any]) -> None:
    """Replay a vector's recorded messages through the code, both roles: the terminal
    makes the recorded request, accepts the recorded challenge, opens the recorded
    delivery and makes the recorded confirmation; the server verifies the recorded proof
    and confirmation. Raise :class:`VectorMismatch` otherwise."""
    name = vector["name"]
    setup = _Setup.of(name, terminal_key_of(vector))
    messages = vector["messages"]
    texts = {key: str(value).encode() for key, value in messages.items()}
    request = DownloadRequest.from_json(texts["download_request"])
    challenge = ServerChallenge.from_json(texts["server_challenge"])
    proof = TerminalProof.from_json(texts["terminal_proof"])
    delivery = KeyDelivery.from_json(texts["key_delivery"])
    confirmation = Confirmation.from_json(texts["confirmation"])
    for key, message in (
        ("download_request", request),
        ("server_challenge", challenge),
        ("terminal_proof", proof),
        ("key_delivery", delivery),
        ("confirmation", confirmation),
    ):
        if message.to_json() != texts[key]:
            raise VectorMismatch(f"{name}: messages.{key} is not in canonical form")
    intermediates = vector["intermediates"]
    if bytes.fromhex(intermediates["wrapped_tmk"]) != delivery.wrapped_tmk:
        raise VectorMismatch(f"{name}: intermediates.wrapped_tmk is not the delivery's")
    parts = _transport_parts(setup, delivery.wrapped_tmk)
    if any(intermediates.get(k) != v for k, v in parts.items()):
        raise VectorMismatch(f"{name}: the parts of wrapped_tmk do not make it up")
    if bytes.fromhex(intermediates["terminal_signature"]) != proof.signature:
        raise VectorMismatch(f"{name}: intermediates.terminal_signature is not the proof's")
    signed = _delivery_signature(setup, challenge.session_id, delivery)
    if any(intermediates.get(k) != v for k, v in signed.items()):
        raise VectorMismatch(
            f"{name}: intermediates.tbs3 or delivery_signature is not the delivery's"
        )
    if any(message.version != setup.version for message in (request, challenge, delivery)):
        raise VectorMismatch(f"{name}: a message is not in protocol version {setup.version}")

    keystore = setup.keystore()
    session, module = setup.terminal()
    if session.start() != request:
        raise VectorMismatch(f"{name}: the terminal makes another request")
    session.receive_challenge(challenge)
    state = open_ticket(proof.ticket, keystore=keystore, key_for=setup.ticket_key_for)
    _, delivered = server_accept_proof(  # verifies the recorded proof
        state,
        proof,
        terminal=setup.registration(),
        keystore=keystore,
        now=PROOF_AT,
        tmk_algorithm=setup.tmk_algorithm,
        work_key=_VectorKeyStore.WORK,
    )
    # the terminal verifies the recorded delivery's signature (v2), then opens it
    if session.receive_delivery(delivery) != confirmation:
        raise VectorMismatch(f"{name}: the recorded delivery gives another confirmation")
    if module.tmk != bytes.fromhex(intermediates["tmk"]):
        raise VectorMismatch(f"{name}: the recorded delivery carries another TMK")
    server_confirm(delivered, confirmation, keystore=keystore, now=CONFIRM_AT)


# =====================================================================================
# The files
# =====================================================================================


def path_of(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def dumps(vector: dict[str, Any]) -> str:
    return json.dumps(vector, indent=2, ensure_ascii=True) + "\n"


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def _keys_for(directory: Path) -> dict[str, PrivateKey]:
    """Each terminal key name's key: from an existing file, else a new one."""
    keys: dict[str, PrivateKey] = {}
    for name in NAMES:
        key_name, _, _ = split_name(name)
        if key_name not in keys and path_of(directory, name).is_file():
            keys[key_name] = terminal_key_of(load(path_of(directory, name)))
    for key_name in TERMINAL_KEYS:
        keys.setdefault(key_name, default_terminal_key(key_name))
    return keys


def write(directory: Path, *, force: bool = False) -> list[Path]:
    """Write the vector files in ``directory`` that are missing or no longer match the code
    (every one with ``force``), keeping existing RSA terminal keys. A file that still
    matches is left as it is: its randomised fields keep their published bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = _keys_for(directory)
    written = []
    for name in NAMES:
        key_name, _, _ = split_name(name)
        path = path_of(directory, name)
        if not force and not problems_of(directory, name):
            continue
        path.write_text(dumps(generate(name, keys[key_name])), encoding="utf-8")
        written.append(path)
    return written


def problems_of(directory: Path, name: str) -> list[str]:
    """What is wrong with one vector file (empty: it matches the code)."""
    path = path_of(directory, name)
    if not path.is_file():
        return [f"{path}: missing"]
    recorded = load(path)
    try:
        check(recorded)
        fresh = generate(name, terminal_key_of(recorded))
    except (VectorMismatch, CryptoError, TmkError, ValueError, KeyError) as exc:
        return [f"{path}: {exc}"]
    return [f"{path}: {found}" for found in differences(recorded, fresh)]


def verify_files(directory: Path) -> list[str]:
    """What is wrong with the vector files in ``directory`` (empty: they match the code)."""
    return [problem for name in NAMES for problem in problems_of(directory, name)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustfleet.tmk.vectors", description=__doc__)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIRECTORY)
    parser.add_argument(
        "--write", action="store_true", help="write the files that are missing or out of date"
    )
    parser.add_argument("--force", action="store_true", help="with --write: every file")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.directory, force=args.force):
            print(f"wrote {path}")
    problems = verify_files(args.directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
