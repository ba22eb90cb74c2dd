"""Remote download of a POS terminal master key (TMK): messages and both roles, sans I/O.

The flow (spec §5, hardened; see ``docs/tmk-protocol.md``)::

    terminal                                            key server
    DownloadRequest(sn, rnd1, suite)            ->
                                                <-      ServerChallenge(session_id, rnd1, rnd2,
                                                            KSWCRT [+ chain], sig_KS(TBS1),
                                                            expires_at, ticket)
    check KSWCRT -> KSRCRT, sig, rnd1
    TerminalProof(session_id, sig_TKP(TBS2),
                  ticket)                       ->
                                                        open the ticket, verify with TKP_Pu
                                                        registered for sn
                                                <-      KeyDelivery(session_id, algorithm,
                                                            KEM(TKP_Pu, TMK, info), kcv)
    [v2: verify sig_KS(TBS3) with KSWCRT's key]
    unwrap in the SCM, check the KCV, store
    Confirmation(session_id, CMAC_TMK(...))     ->
                                                        verify -> TMK active

Two protocol versions: the terminal names its version in the request (``"v"``) and the
server answers the whole session in it. Version 2 adds the work key's signature over the
delivery (TBS3, in ``KeyDelivery.signature``: v2's ``sig_KS`` above), so a terminal installs
a TMK only from the key server it authenticated in the challenge; every signed, bound or
MACed transcript carries its version in its label, so neither side can be moved to the
other version unnoticed (docs/tmk-protocol.md, "Protocol versions").

Nothing here does I/O, reads the clock or draws randomness on its own: the server role is
a set of pure functions over a serialisable :class:`ServerSessionState`. Between the
challenge and the proof the state travels with the terminal, sealed in a session ticket
(:func:`seal_ticket`: the state and a MAC under a key store key, echoed back unchanged), so
a challenge costs the server no storage; from the proof on, the service keeps it in its
database. The terminal role is :class:`TerminalSession`, an object fed with messages. Time
and randomness are parameters.

Every message is a frozen dataclass with a canonical JSON encoding (sorted keys, no
whitespace, standard base64 with padding for bytes, RFC 3339 UTC seconds for times) and a
strict parser: anything malformed raises :class:`TmkMalformedMessage`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Protocol, Self, TypeVar

from cryptography import x509

from trustfleet import wire
from trustfleet.crypto import algorithm_of, suite_for_algorithm
from trustfleet.crypto.base import KeyAlgorithm, PublicKey, Suite
from trustfleet.errors import (
    CertificateRevoked,
    CryptoError,
    InvalidSignature,
    KeyNotFound,
    PkiError,
    TrustfleetError,
    UnsupportedAlgorithm,
)
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.kit import tickets
from trustfleet.kit.sessions import (
    SESSION_ID_PATTERN,
    SESSION_ID_RULE,
    RandomSource,
    SessionErrors,
    SingleUseRole,
    expect,
    expired,
    new_session_id,
)
from trustfleet.kit.tickets import TicketKey
from trustfleet.pki.x509 import ChainPolicy, CrlCheck, validate_chain
from trustfleet.tmk.errors import (
    TmkBadConfirmation,
    TmkBadDeliverySignature,
    TmkBadServerSignature,
    TmkBadTerminalProof,
    TmkInvalidTicket,
    TmkMalformedMessage,
    TmkOutOfOrder,
    TmkReplay,
    TmkRevokedServerCertificate,
    TmkSessionExpired,
    TmkUnsupportedSuite,
    TmkUnsupportedVersion,
    TmkUntrustedServerCertificate,
    TmkVersionMismatch,
)
from trustfleet.wire import (
    Alphabet,
    Codec,
    Fields,
    canonical_json,
    format_time,
    transcript,
    utc_seconds,
    utcnow,
)

PROTOCOL_V1 = 1
#: version 2: the work key signs the delivery too (TBS3)
PROTOCOL_V2 = 2
#: the versions this code speaks, both roles
PROTOCOL_VERSIONS = frozenset({PROTOCOL_V1, PROTOCOL_V2})
#: the newest version: what the reference terminal speaks unless told otherwise
PROTOCOL_VERSION = PROTOCOL_V2
DEFAULT_RANDOM_SIZE = 32
MIN_RANDOM_SIZE = 16
MAX_RANDOM_SIZE = 64
DEFAULT_SESSION_TTL = timedelta(seconds=60)
MAX_MESSAGE_SIZE = 64 * 1024
MAX_CHAIN_LENGTH = 4
MAX_TICKET_SIZE = 2048

#: suites a terminal may download with (the suite of its TKP)
SUPPORTED_SUITES = frozenset({"p256", "rsa", "gm", "ed25519"})
#: algorithms a TMK may have
TMK_ALGORITHMS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES})
#: KCV length per TMK algorithm (X9.24: 3 bytes for TDES, 5 bytes for AES)
KCV_LENGTHS = {KeyAlgorithm.TDES: 3, KeyAlgorithm.AES_128: 5, KeyAlgorithm.AES_256: 5}
#: what the key server's TMK may do: protect working keys (AES key wrap; TDES working keys
#: travel in TR-31 blocks instead), MAC, and leave the store once, wrapped to the terminal
TMK_USAGE = {
    KeyAlgorithm.AES_128: KeyUsage.WRAP | KeyUsage.MAC | KeyUsage.WRAPPABLE,
    KeyAlgorithm.AES_256: KeyUsage.WRAP | KeyUsage.MAC | KeyUsage.WRAPPABLE,
    KeyAlgorithm.TDES: KeyUsage.WRAP | KeyUsage.MAC | KeyUsage.WRAPPABLE,
}

#: TKP algorithms whose key both signs and receives the TMK; Ed25519 terminals need an
#: X25519 key beside it
_SELF_TRANSPORT_ALGORITHMS = frozenset(
    {KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.SM2}
)
_KEM_ALGORITHMS = _SELF_TRANSPORT_ALGORITHMS | {KeyAlgorithm.X25519}

Clock = Callable[[], datetime]
_R = TypeVar("_R")

_SN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SUITE_PATTERN = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True, slots=True)
class _Labels:
    """The labels of one protocol version's transcripts: each names its version, so a
    signature, a transport binding or a MAC of one version is worthless in the other."""

    server_auth: bytes
    terminal_auth: bytes
    tmk_transport: bytes
    confirm: bytes
    key_delivery: bytes | None  # None: the version does not sign the delivery

    @classmethod
    def of(cls, prefix: str, *, signed_delivery: bool) -> _Labels:
        return cls(
            server_auth=f"{prefix} server-auth".encode(),
            terminal_auth=f"{prefix} terminal-auth".encode(),
            tmk_transport=f"{prefix} tmk-transport".encode(),
            confirm=f"{prefix} confirm".encode(),
            key_delivery=f"{prefix} key-delivery".encode() if signed_delivery else None,
        )


_LABELS = {
    PROTOCOL_V1: _Labels.of("TF-TMK-v1", signed_delivery=False),
    PROTOCOL_V2: _Labels.of("TF-TMK-v2", signed_delivery=True),
}
#: one ticket format for both versions: the sealed state says its version
_TICKET = b"TF-TMK-v1 session-ticket"


def _labels(version: int) -> _Labels:
    labels = _LABELS.get(version)
    if labels is None:
        raise TmkUnsupportedVersion(f"protocol version {version!r} is not spoken here")
    return labels


def require_version(version: int, accepted: Collection[int] = PROTOCOL_VERSIONS) -> None:
    """A download in ``version`` may go on (``accepted``: the versions this side takes),
    else :class:`TmkUnsupportedVersion`."""
    if version not in accepted:
        expected = ", ".join(str(v) for v in sorted(accepted))
        raise TmkUnsupportedVersion(f"protocol version {version} is not accepted ({expected})")


# =====================================================================================
# Field checks (the codec is trustfleet.wire's, with this protocol's error and alphabet)
# =====================================================================================

CODEC = Codec(
    malformed=TmkMalformedMessage,
    alphabet=Alphabet.STANDARD,
    version=PROTOCOL_V1,
    max_size=MAX_MESSAGE_SIZE,
    versions=PROTOCOL_VERSIONS,
    unsupported_version=TmkUnsupportedVersion,
)


def validate_sn(sn: object) -> None:
    """A hardware serial number as the protocol accepts it; else TmkMalformedMessage."""
    CODEC.check_text(sn, "sn", _SN_PATTERN, "1-64 characters of A-Z a-z 0-9 . _ - (first alnum)")


def _check_suite_name(suite: object) -> None:
    CODEC.check_text(suite, "suite", _SUITE_PATTERN, "1-32 characters of a-z 0-9 -")


def _check_session_id(session_id: object) -> None:
    CODEC.check_text(session_id, "session_id", SESSION_ID_PATTERN, SESSION_ID_RULE)


def _check_random(value: object, name: str) -> None:
    CODEC.check_bytes(value, name, MIN_RANDOM_SIZE, MAX_RANDOM_SIZE)


def _check_version(value: object) -> None:
    if type(value) is not int or value not in PROTOCOL_VERSIONS:
        CODEC.fail("version must be one of the protocol versions (1, 2)")


def _check_tmk_algorithm(value: object) -> None:
    if value not in TMK_ALGORITHMS:
        CODEC.fail("algorithm must be one of aes-128, aes-256, tdes")


_b64 = CODEC.encode_bytes
_TMK_ALGORITHM_NAMES = frozenset(a.value for a in TMK_ALGORITHMS)


# =====================================================================================
# Messages
# =====================================================================================


class _Message(wire.Message):
    """A TMK download message: each says its protocol version (the ``v`` field)."""

    CODEC = CODEC
    version: int

    def wire_version(self) -> int:
        return self.version


@dataclass(frozen=True, slots=True)
class DownloadRequest(_Message):
    """Step 1, terminal -> server: who I am, my fresh random, the suite of my TKP."""

    TYPE: ClassVar[str] = "tmk-download-request"
    sn: str
    rnd1: bytes
    suite: str
    #: the version the terminal speaks; the server answers the session in it
    version: int = PROTOCOL_V1

    def __post_init__(self) -> None:
        validate_sn(self.sn)
        _check_random(self.rnd1, "rnd1")
        _check_suite_name(self.suite)
        _check_version(self.version)

    def _fields(self) -> dict[str, Any]:
        return {"sn": self.sn, "rnd1": _b64(self.rnd1), "suite": self.suite}

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(
            sn=fields.text("sn"),
            rnd1=fields.blob("rnd1"),
            suite=fields.text("suite"),
            version=fields.version,
        )


@dataclass(frozen=True, slots=True)
class ServerChallenge(_Message):
    """Step 2, server -> terminal: a session, the server's random, its work certificate
    (and any intermediates) and its signature over TBS1 (see :func:`server_auth_tbs`).

    ``rnd1`` echoes the terminal's random so a challenge meant for another request is
    recognised before any signature check. ``ticket`` is opaque to the terminal: it sends it
    back unchanged with its proof (and with an abort).
    """

    TYPE: ClassVar[str] = "tmk-server-challenge"
    session_id: str
    rnd1: bytes
    rnd2: bytes
    kswcrt_der: bytes
    signature: bytes
    expires_at: datetime
    ticket: bytes
    chain_der: tuple[bytes, ...] = ()
    version: int = PROTOCOL_V1

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_session_id(self.session_id)
        _check_random(self.rnd1, "rnd1")
        _check_random(self.rnd2, "rnd2")
        CODEC.check_bytes(self.kswcrt_der, "kswcrt_der", 1, 16384)
        CODEC.check_bytes(self.signature, "signature", 1, 1024)
        CODEC.check_time(self.expires_at, "expires_at")
        CODEC.check_bytes(self.ticket, "ticket", 1, MAX_TICKET_SIZE)
        if not isinstance(self.chain_der, tuple) or len(self.chain_der) > MAX_CHAIN_LENGTH:
            CODEC.fail(f"chain_der must hold at most {MAX_CHAIN_LENGTH} certificates")
        for cert in self.chain_der:
            CODEC.check_bytes(cert, "chain_der", 1, 16384)

    def _fields(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "rnd1": _b64(self.rnd1),
            "rnd2": _b64(self.rnd2),
            "kswcrt": _b64(self.kswcrt_der),
            "chain": [_b64(cert) for cert in self.chain_der],
            "signature": _b64(self.signature),
            "expires_at": format_time(self.expires_at),
            "ticket": _b64(self.ticket),
        }

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(
            session_id=fields.text("session_id"),
            rnd1=fields.blob("rnd1"),
            rnd2=fields.blob("rnd2"),
            kswcrt_der=fields.blob("kswcrt"),
            chain_der=fields.blob_list("chain", MAX_CHAIN_LENGTH),
            signature=fields.blob("signature"),
            expires_at=fields.time("expires_at"),
            ticket=fields.blob("ticket"),
            version=fields.version,
        )


@dataclass(frozen=True, slots=True)
class TerminalProof(_Message):
    """Step 4, terminal -> server: the TKP's signature over TBS2 (:func:`terminal_auth_tbs`)
    and the challenge's ticket, unchanged."""

    TYPE: ClassVar[str] = "tmk-terminal-proof"
    session_id: str
    signature: bytes
    ticket: bytes
    version: int = PROTOCOL_V1

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_session_id(self.session_id)
        CODEC.check_bytes(self.signature, "signature", 1, 1024)
        CODEC.check_bytes(self.ticket, "ticket", 1, MAX_TICKET_SIZE)

    def _fields(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "signature": _b64(self.signature),
            "ticket": _b64(self.ticket),
        }

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(
            session_id=fields.text("session_id"),
            signature=fields.blob("signature"),
            ticket=fields.blob("ticket"),
            version=fields.version,
        )


@dataclass(frozen=True, slots=True)
class KeyDelivery(_Message):
    """Step 6, server -> terminal: the TMK, key-transported to the terminal's KEM key and
    bound to the session (:func:`transport_info`), and its key check value. From version 2
    on, ``signature`` is the work key's signature over TBS3 (:func:`key_delivery_tbs`);
    a version 1 delivery has none."""

    TYPE: ClassVar[str] = "tmk-key-delivery"
    session_id: str
    algorithm: KeyAlgorithm
    wrapped_tmk: bytes
    kcv: bytes
    signature: bytes | None = None
    version: int = PROTOCOL_V1

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_session_id(self.session_id)
        _check_tmk_algorithm(self.algorithm)
        CODEC.check_bytes(self.wrapped_tmk, "wrapped_tmk", 1, 4096)
        length = KCV_LENGTHS[self.algorithm]
        CODEC.check_bytes(self.kcv, "kcv", length, length)
        if _labels(self.version).key_delivery is not None:
            CODEC.check_bytes(self.signature, "signature", 1, 1024)
        elif self.signature is not None:
            CODEC.fail(f"a version {self.version} delivery carries no signature")

    def _fields(self) -> dict[str, Any]:
        fields = {
            "session_id": self.session_id,
            "algorithm": self.algorithm.value,
            "wrapped_tmk": _b64(self.wrapped_tmk),
            "kcv": _b64(self.kcv),
        }
        if self.signature is not None:
            fields["signature"] = _b64(self.signature)
        return fields

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        signed = _labels(fields.version).key_delivery is not None
        return cls(
            session_id=fields.text("session_id"),
            algorithm=KeyAlgorithm(fields.choice("algorithm", _TMK_ALGORITHM_NAMES)),
            wrapped_tmk=fields.blob("wrapped_tmk"),
            kcv=fields.blob("kcv"),
            signature=fields.blob("signature") if signed else None,
            version=fields.version,
        )


@dataclass(frozen=True, slots=True)
class Confirmation(_Message):
    """Step 7, terminal -> server: CMAC under the new TMK over (session_id, kcv)."""

    TYPE: ClassVar[str] = "tmk-confirmation"
    session_id: str
    mac: bytes
    version: int = PROTOCOL_V1

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_session_id(self.session_id)
        CODEC.check_bytes(self.mac, "mac", 8, 16)

    def _fields(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "mac": _b64(self.mac)}

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(
            session_id=fields.text("session_id"), mac=fields.blob("mac"), version=fields.version
        )


Message = DownloadRequest | ServerChallenge | TerminalProof | KeyDelivery | Confirmation
_MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (DownloadRequest, ServerChallenge, TerminalProof, KeyDelivery, Confirmation)
}


def parse_message(data: bytes | str) -> Message:
    """Parse any TMK download message by its ``type`` field."""
    message_type = CODEC.load(data).get("type")
    if not isinstance(message_type, str) or message_type not in _MESSAGE_TYPES:
        CODEC.fail("unknown message type")
    return _MESSAGE_TYPES[message_type].from_json(data)


# =====================================================================================
# What gets signed, MACed and bound (shared by both roles and by the SCM)
# =====================================================================================


def server_auth_tbs(
    *,
    sn: str,
    suite: str,
    session_id: str,
    rnd1: bytes,
    rnd2: bytes,
    expires_at: datetime,
    version: int = PROTOCOL_V1,
) -> bytes:
    """TBS1, signed by the key server's work key. Its label names the version, so the
    signature also says which version the server answered in."""
    return transcript(
        _labels(version).server_auth,
        rnd1,
        rnd2,
        sn.encode(),
        session_id.encode(),
        suite.encode(),
        format_time(expires_at).encode(),
    )


def terminal_auth_tbs(
    *,
    sn: str,
    suite: str,
    session_id: str,
    rnd1: bytes,
    rnd2: bytes,
    version: int = PROTOCOL_V1,
) -> bytes:
    """TBS2, signed by the terminal's TKP. Randoms in the other order and another label
    than TBS1, so neither signature can stand in for the other."""
    return transcript(
        _labels(version).terminal_auth,
        rnd2,
        rnd1,
        sn.encode(),
        session_id.encode(),
        suite.encode(),
    )


def key_delivery_tbs(
    *,
    sn: str,
    suite: str,
    session_id: str,
    rnd1: bytes,
    rnd2: bytes,
    algorithm: KeyAlgorithm,
    wrapped_tmk: bytes,
    kcv: bytes,
    version: int = PROTOCOL_V2,
) -> bytes:
    """TBS3 (version 2 on), signed by the key server's work key: the delivery as sent, in
    the session both sides authenticated. Its own label: no other signature of the work
    key (TBS1) stands in for it."""
    label = _labels(version).key_delivery
    if label is None:
        raise ValueError(f"protocol version {version} does not sign the delivery")
    return transcript(
        label,
        session_id.encode(),
        sn.encode(),
        suite.encode(),
        rnd1,
        rnd2,
        algorithm.value.encode(),
        wrapped_tmk,
        kcv,
    )


def transport_info(
    suite: Suite,
    *,
    sn: str,
    session_id: str,
    rnd1: bytes,
    rnd2: bytes,
    algorithm: KeyAlgorithm,
    version: int = PROTOCOL_V1,
) -> bytes:
    """The transcript hash the TMK's key transport is bound to (KEM ``info``/OAEP label)."""
    encoded = transcript(
        _labels(version).tmk_transport,
        sn.encode(),
        suite.name.encode(),
        session_id.encode(),
        rnd1,
        rnd2,
        algorithm.value.encode(),
    )
    return suite.hash(encoded)


def confirmation_data(*, session_id: str, kcv: bytes, version: int = PROTOCOL_V1) -> bytes:
    """What the terminal CMACs under the new TMK to prove it holds it."""
    return transcript(_labels(version).confirm, session_id.encode(), kcv)


def suite_for_terminal_key(public_key: PublicKey) -> Suite:
    """The suite of a TKP public key; only signature keys of the supported suites."""
    try:
        suite = suite_for_algorithm(algorithm_of(public_key))
    except TrustfleetError:
        raise TmkUnsupportedSuite("the terminal's key is of no supported suite") from None
    if suite.name not in SUPPORTED_SUITES or algorithm_of(public_key) == KeyAlgorithm.X25519:
        raise TmkUnsupportedSuite("the terminal's key cannot sign for a TMK download")
    return suite


#: this protocol's errors for the kit's session guards
SESSION_ERRORS = SessionErrors(
    out_of_order=TmkOutOfOrder, expired=TmkSessionExpired, replay=TmkReplay
)


# =====================================================================================
# Server role: pure functions over a serialisable state
# =====================================================================================


class ServerStage(StrEnum):
    CHALLENGED = "challenged"  # challenge sent, waiting for the terminal's proof
    DELIVERED = "delivered"  # TMK generated and sent, waiting for the confirmation
    ACTIVE = "active"  # confirmation verified: the TMK is in force (terminal state)
    ABORTED = "aborted"  # a check failed or the session expired (terminal state)


@dataclass(frozen=True, slots=True)
class RegisteredTerminal:
    """What the key server registered for a terminal at the factory.

    ``auth_public`` is TKP_Pu. ``kem_public`` is the key the TMK is transported to; it is
    TKP_Pu itself for P-256, RSA and SM2 terminals and a separate X25519 key for Ed25519
    terminals (Ed25519 cannot encrypt).
    """

    sn: str
    auth_public: PublicKey
    kem_public: PublicKey | None = None

    @property
    def suite(self) -> Suite:
        return suite_for_terminal_key(self.auth_public)

    @property
    def transport_key(self) -> PublicKey:
        """The public key the TMK is transported to (key-transport capable, same suite)."""
        if self.kem_public is None:
            if algorithm_of(self.auth_public) in _SELF_TRANSPORT_ALGORITHMS:
                return self.auth_public
            raise TmkUnsupportedSuite(
                f"a {self.suite.name} terminal needs a separate key-transport key"
            )
        kem_algorithm = algorithm_of(self.kem_public)
        if (
            kem_algorithm not in _KEM_ALGORITHMS
            or suite_for_algorithm(kem_algorithm).name != self.suite.name
        ):
            raise TmkUnsupportedSuite("the terminal's key-transport key does not fit its suite")
        return self.kem_public


@dataclass(frozen=True, slots=True)
class ServerSessionState:
    """Everything the server remembers about one download between two requests.

    Holds no secret: the randoms are public, ``tmk_handle`` is an opaque key store handle.
    Persist it with :meth:`to_json` and pass it back into the next ``server_*`` call.
    ``version`` is the session's protocol version (the request's); a version 1 state
    encodes as it did before versions existed (no ``version`` key), so the tickets and
    stored states of version 1 keep their bytes.
    """

    session_id: str
    sn: str
    suite: str
    rnd1: bytes
    rnd2: bytes
    stage: ServerStage
    created_at: datetime
    expires_at: datetime
    tmk_handle: str | None = None
    tmk_algorithm: KeyAlgorithm | None = None
    kcv: bytes | None = None
    version: int = PROTOCOL_V1

    def to_json(self) -> bytes:
        versioned = {} if self.version == PROTOCOL_V1 else {"version": self.version}
        return canonical_json(
            {
                **versioned,
                "session_id": self.session_id,
                "sn": self.sn,
                "suite": self.suite,
                "rnd1": _b64(self.rnd1),
                "rnd2": _b64(self.rnd2),
                "stage": self.stage.value,
                "created_at": format_time(self.created_at),
                "expires_at": format_time(self.expires_at),
                "tmk_handle": self.tmk_handle,
                "tmk_algorithm": self.tmk_algorithm.value if self.tmk_algorithm else None,
                "kcv": _b64(self.kcv) if self.kcv is not None else None,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        obj = CODEC.load(data)
        expected = {
            "session_id", "sn", "suite", "rnd1", "rnd2", "stage", "created_at",
            "expires_at", "tmk_handle", "tmk_algorithm", "kcv",
        }  # fmt: skip
        version = obj.get("version", PROTOCOL_V1)
        if set(obj) - {"version"} != expected or ("version" in obj and version == PROTOCOL_V1):
            CODEC.fail("not a TMK server session state")  # version 1 has no version key
        try:
            state = cls(
                session_id=obj["session_id"],
                sn=obj["sn"],
                suite=obj["suite"],
                rnd1=CODEC.decode_bytes(obj["rnd1"], "rnd1"),
                rnd2=CODEC.decode_bytes(obj["rnd2"], "rnd2"),
                stage=ServerStage(obj["stage"]),
                created_at=CODEC.parse_time(obj["created_at"], "created_at"),
                expires_at=CODEC.parse_time(obj["expires_at"], "expires_at"),
                tmk_handle=obj["tmk_handle"],
                tmk_algorithm=(
                    KeyAlgorithm(obj["tmk_algorithm"]) if obj["tmk_algorithm"] else None
                ),
                kcv=CODEC.decode_bytes(obj["kcv"], "kcv") if obj["kcv"] is not None else None,
                version=version,
            )
        except (TypeError, ValueError):
            CODEC.fail("not a TMK server session state")
        return state

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_session_id(self.session_id)
        validate_sn(self.sn)
        _check_suite_name(self.suite)
        _check_random(self.rnd1, "rnd1")
        _check_random(self.rnd2, "rnd2")
        if not isinstance(self.stage, ServerStage):
            CODEC.fail("stage must be a ServerStage")
        CODEC.check_time(self.created_at, "created_at")
        CODEC.check_time(self.expires_at, "expires_at")
        if self.tmk_handle is not None and not isinstance(self.tmk_handle, str):
            CODEC.fail("tmk_handle must be a string")
        if self.stage in (ServerStage.DELIVERED, ServerStage.ACTIVE):
            self._check_tmk()

    def _check_tmk(self) -> None:
        if not self.tmk_handle or self.tmk_algorithm not in TMK_ALGORITHMS:
            CODEC.fail(f"a {self.stage.value} session needs its TMK handle and algorithm")
        length = KCV_LENGTHS[self.tmk_algorithm]
        CODEC.check_bytes(self.kcv, "kcv", length, length)

    @property
    def tmk(self) -> tuple[str, KeyAlgorithm, bytes]:
        """Handle, algorithm and KCV of the session's TMK (delivered or active sessions)."""
        self._check_tmk()
        assert self.tmk_handle and self.tmk_algorithm and self.kcv is not None  # by _check_tmk
        return self.tmk_handle, self.tmk_algorithm, self.kcv


@dataclass(frozen=True, slots=True)
class TmkActivated:
    """Event: the terminal proved it holds the TMK; the service marks it active."""

    session_id: str
    sn: str
    tmk_handle: str
    algorithm: KeyAlgorithm
    kcv: bytes
    activated_at: datetime


def server_start(
    request: DownloadRequest,
    *,
    terminal: RegisteredTerminal,
    keystore: KeyStore,
    work_key: str,
    kswcrt_der: bytes,
    ticket_key: TicketKey,
    chain_der: tuple[bytes, ...] = (),
    now: datetime,
    ttl: timedelta = DEFAULT_SESSION_TTL,
    random: RandomSource = os.urandom,
    versions: Collection[int] = PROTOCOL_VERSIONS,
) -> tuple[ServerChallenge, ServerSessionState]:
    """Steps 1-2: open a session for ``request`` and sign the challenge with ``work_key``
    (the key store handle of the private key certified by ``kswcrt_der``). The session's
    state goes out sealed in the challenge's ticket (:func:`seal_ticket`); it is returned
    too, for callers that keep it themselves.

    The session is in the request's protocol version, which must be one of ``versions``
    (the server's setting may refuse version 1). ``terminal`` is the registration the
    service looked up by ``request.sn``.
    """
    require_version(request.version, versions)
    if terminal.sn != request.sn:
        raise TmkBadTerminalProof("the registration is not the requesting terminal's")
    suite = terminal.suite
    if request.suite != suite.name:
        raise TmkUnsupportedSuite(
            f"the terminal asked for suite {request.suite!r} but is registered for {suite.name!r}"
        )
    _ = terminal.transport_key  # fail now, not after the proof, if it cannot receive a TMK
    now = utc_seconds(now)
    state = ServerSessionState(
        session_id=new_session_id(random),
        sn=request.sn,
        suite=suite.name,
        rnd1=request.rnd1,
        rnd2=random(DEFAULT_RANDOM_SIZE),
        stage=ServerStage.CHALLENGED,
        created_at=now,
        expires_at=now + ttl,
        version=request.version,
    )
    tbs = server_auth_tbs(
        sn=state.sn,
        suite=state.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        expires_at=state.expires_at,
        version=state.version,
    )
    challenge = ServerChallenge(
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        kswcrt_der=kswcrt_der,
        chain_der=tuple(chain_der),
        signature=keystore.sign(work_key, tbs),
        expires_at=state.expires_at,
        ticket=seal_ticket(state, keystore=keystore, key=ticket_key),
        version=state.version,
    )
    return challenge, state


def seal_ticket(state: ServerSessionState, *, keystore: KeyStore, key: TicketKey) -> bytes:
    """A challenged session's state, sealed for the terminal to carry until its proof
    (:mod:`trustfleet.kit.tickets`: ``version || key id || state JSON || HMAC``)."""
    if state.stage is not ServerStage.CHALLENGED:
        raise ValueError("only a challenged session travels in a ticket")
    return tickets.seal_ticket(state.to_json(), keystore=keystore, key=key, label=_TICKET)


def open_ticket(
    ticket: bytes, *, keystore: KeyStore, key_for: Callable[[int], str | None]
) -> ServerSessionState:
    """The challenged state a ticket sealed, or :class:`TmkInvalidTicket` if this server did
    not seal it (or it was altered). ``key_for`` maps a ticket key id to its key store
    handle, None for a key that no longer seals tickets. Expiry is the caller's check
    (:func:`server_accept_proof` makes it)."""
    payload = tickets.open_ticket(
        ticket, keystore=keystore, key_for=key_for, label=_TICKET, invalid=TmkInvalidTicket
    )
    state = ServerSessionState.from_json(payload)
    if state.stage is not ServerStage.CHALLENGED:
        raise TmkInvalidTicket()
    return state


def server_accept_proof(
    state: ServerSessionState,
    proof: TerminalProof,
    *,
    terminal: RegisteredTerminal,
    keystore: KeyStore,
    now: datetime,
    tmk_algorithm: KeyAlgorithm = KeyAlgorithm.AES_128,
    work_key: str | None = None,
) -> tuple[KeyDelivery, ServerSessionState]:
    """Steps 4-6: verify the terminal's proof, generate the TMK inside the key store and
    transport it to the terminal. On any error call :func:`server_abort`.

    From version 2 on, ``work_key`` (the key store handle of the key that signed the
    session's challenge) signs the delivery (TBS3): the terminal verifies it with the key
    of the KSWCRT it validated in the challenge, so it must be the same key."""
    _expect(state, ServerStage.CHALLENGED, proof.session_id, now)
    _same_version(state, proof.version)
    signs_delivery = _labels(state.version).key_delivery is not None
    if signs_delivery and work_key is None:
        raise ValueError(f"a version {state.version} delivery is signed: give the work key")
    if terminal.sn != state.sn:
        raise TmkBadTerminalProof("the registration is not this session's terminal")
    if tmk_algorithm not in TMK_ALGORITHMS:
        raise TmkUnsupportedSuite(f"a TMK cannot be {tmk_algorithm}")
    suite = terminal.suite
    if suite.name != state.suite:
        raise TmkBadTerminalProof("the terminal's registered key changed during the session")
    tbs = terminal_auth_tbs(
        sn=state.sn,
        suite=state.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        version=state.version,
    )
    try:
        suite.verify(terminal.auth_public, tbs, proof.signature)
    except CryptoError:
        raise TmkBadTerminalProof() from None

    info = transport_info(
        suite,
        sn=state.sn,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        algorithm=tmk_algorithm,
        version=state.version,
    )
    tmk = keystore.generate(
        tmk_algorithm, TMK_USAGE[tmk_algorithm], label=f"tmk:{state.sn}:{state.session_id}"
    )
    try:
        wrapped = keystore.wrap(tmk.handle, under=terminal.transport_key, info=info)
        kcv = keystore_kcv(keystore, tmk.handle, tmk_algorithm)
        signature = None
        if work_key is not None and signs_delivery:
            signature = _sign_delivery(
                state, keystore, work_key, algorithm=tmk_algorithm, wrapped_tmk=wrapped, kcv=kcv
            )
    except BaseException:
        keystore.destroy(tmk.handle)
        raise
    delivery = KeyDelivery(
        session_id=state.session_id,
        algorithm=tmk_algorithm,
        wrapped_tmk=wrapped,
        kcv=kcv,
        signature=signature,
        version=state.version,
    )
    new_state = replace(
        state,
        stage=ServerStage.DELIVERED,
        tmk_handle=tmk.handle,
        tmk_algorithm=tmk_algorithm,
        kcv=kcv,
    )
    return delivery, new_state


def _sign_delivery(
    state: ServerSessionState,
    keystore: KeyStore,
    work_key: str,
    *,
    algorithm: KeyAlgorithm,
    wrapped_tmk: bytes,
    kcv: bytes,
) -> bytes:
    """The work key's signature over TBS3. A work key destroyed since the challenge (the
    work certificate was rotated in between) cannot sign: the terminal could not verify
    another key's signature, so the session is refused and the terminal starts again."""
    tbs = key_delivery_tbs(
        sn=state.sn,
        suite=state.suite,
        session_id=state.session_id,
        rnd1=state.rnd1,
        rnd2=state.rnd2,
        algorithm=algorithm,
        wrapped_tmk=wrapped_tmk,
        kcv=kcv,
        version=state.version,
    )
    try:
        return keystore.sign(work_key, tbs)
    except KeyNotFound:
        raise TmkInvalidTicket("the work key that signed this challenge is gone") from None


def server_confirm(
    state: ServerSessionState,
    confirmation: Confirmation,
    *,
    keystore: KeyStore,
    now: datetime,
) -> tuple[TmkActivated, ServerSessionState]:
    """Step 7: check the terminal's CMAC under the TMK; only then is the TMK active.
    On any error call :func:`server_abort`."""
    _expect(state, ServerStage.DELIVERED, confirmation.session_id, now)
    _same_version(state, confirmation.version)
    handle, algorithm, kcv = state.tmk
    data = confirmation_data(session_id=state.session_id, kcv=kcv, version=state.version)
    try:
        keystore.mac_verify(handle, data, confirmation.mac)
    except InvalidSignature:
        raise TmkBadConfirmation() from None
    event = TmkActivated(
        session_id=state.session_id,
        sn=state.sn,
        tmk_handle=handle,
        algorithm=algorithm,
        kcv=kcv,
        activated_at=now,
    )
    return event, replace(state, stage=ServerStage.ACTIVE)


def server_abort(state: ServerSessionState, *, keystore: KeyStore) -> ServerSessionState:
    """End a session that failed or expired: destroy a TMK that was never confirmed.

    Sessions are single-use: the service persists this state when a step of the session
    is refused (docs/tmk-protocol.md, "Error codes", says which refusals end it), so a
    refused proof or confirmation cannot be tried again against the same session.
    """
    if state.stage is ServerStage.ACTIVE:
        raise TmkOutOfOrder("an active TMK is not aborted; revoke it instead")
    if state.stage is ServerStage.DELIVERED and state.tmk_handle is not None:
        keystore.destroy(state.tmk_handle)
    return replace(state, stage=ServerStage.ABORTED)


def _expect(state: ServerSessionState, stage: ServerStage, session_id: str, now: datetime) -> None:
    expect(
        SESSION_ERRORS,
        stage=state.stage,
        expected=stage,
        session_id=state.session_id,
        message_session_id=session_id,
        expires_at=state.expires_at,
        now=now,
    )


def _same_version(state: ServerSessionState, version: int) -> None:
    if version != state.version:
        raise TmkVersionMismatch(
            f"a version {version} message in a version {state.version} session"
        )


def keystore_kcv(keystore: KeyStore, handle: str, algorithm: KeyAlgorithm) -> bytes:
    """The KCV of a key that never leaves the key store (X9.24: TDES-ECB or AES-CMAC of
    zeros, as :func:`trustfleet.crypto.payment.kcv.kcv` computes it from raw keys)."""
    try:
        value = keystore.kcv(handle)
    except UnsupportedAlgorithm as exc:
        raise TmkUnsupportedSuite(
            f"this key store cannot compute the KCV of a {algorithm} key"
        ) from exc
    return value[: KCV_LENGTHS[algorithm]]


# =====================================================================================
# Terminal role
# =====================================================================================


#: what a terminal requires of the key server's work certificate (KSWCRT): it may sign,
#: and it is not a CA
KSWCRT_POLICY = ChainPolicy(key_usage=("digital_signature",), max_intermediates=MAX_CHAIN_LENGTH)


@dataclass(frozen=True, slots=True)
class ServerTrust:
    """What the terminal trusts: its preloaded root(s) KSRCRT and, optionally, CRLs.

    A work certificate is accepted if it chains (directly or via intermediates sent in the
    challenge) to a root, every certificate is valid at ``now``, it meets
    :data:`KSWCRT_POLICY`, and no CRL given for an issuer of the chain revokes a certificate
    of it (an issuer with CRLs here needs a current, correctly signed one). The validation
    is the PKI's (:func:`trustfleet.pki.x509.validate_chain`, pyca's path building).
    """

    roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = field(default=())

    def verify(self, kswcrt_der: bytes, chain_der: tuple[bytes, ...], now: datetime) -> PublicKey:
        """Return the work certificate's public key, or raise why it is not trusted."""
        if not self.roots:
            raise TmkUntrustedServerCertificate("the terminal holds no root certificate")
        try:
            validated = validate_chain(
                kswcrt_der,
                chain_der,
                self.roots,
                at=now,
                crl_ders=self.crls,
                crls=CrlCheck.WHEN_GIVEN,
                policy=KSWCRT_POLICY,
            )
        except CertificateRevoked:
            raise TmkRevokedServerCertificate() from None
        except PkiError as exc:
            raise TmkUntrustedServerCertificate(exc.message) from None
        return validated.leaf.public_key()  # type: ignore[return-value]  # pyca keys are PublicKey's


class TerminalKeyModule(Protocol):
    """What the terminal role needs from its secure control module (see ``scm.py``).

    Every operation is specific to the TMK download, so the module never acts as a
    general signing or decryption oracle for TKP_Pr. ``version`` is the session's protocol
    version: it picks the labels of TBS2, the transport info and the confirmation data.
    """

    @property
    def sn(self) -> str: ...

    @property
    def suite(self) -> str: ...

    def sign_terminal_proof(
        self, *, session_id: str, rnd1: bytes, rnd2: bytes, version: int
    ) -> bytes: ...

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
        """Unwrap, check the KCV (TmkUnwrapFailed / TmkKcvMismatch), store the TMK."""

    def confirmation_mac(self, *, session_id: str, kcv: bytes, version: int) -> bytes: ...


class TerminalStage(StrEnum):
    IDLE = "idle"
    REQUESTED = "requested"  # DownloadRequest sent
    PROVED = "proved"  # server authenticated, TerminalProof sent
    CONFIRMED = "confirmed"  # TMK installed, Confirmation sent
    FAILED = "failed"


class TerminalSession(SingleUseRole[TerminalStage]):
    """The terminal's side of one download. Single-use: after an error or the final step,
    every further call raises :class:`TmkOutOfOrder`.

    ``version`` is the protocol version the terminal speaks (the newest by default). It
    is the terminal's own setting, never negotiated down: a challenge or a delivery in
    another version is refused (:class:`TmkVersionMismatch`), and nothing here retries in
    another version after a refusal. In version 2 the delivery must carry the signature
    of the work key the challenge was verified with."""

    def __init__(
        self,
        module: TerminalKeyModule,
        trust: ServerTrust,
        *,
        clock: Clock = utcnow,
        random: RandomSource = os.urandom,
        random_size: int = DEFAULT_RANDOM_SIZE,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        if not MIN_RANDOM_SIZE <= random_size <= MAX_RANDOM_SIZE:
            raise ValueError(f"random_size must be {MIN_RANDOM_SIZE}..{MAX_RANDOM_SIZE}")
        if version not in PROTOCOL_VERSIONS:
            raise ValueError(f"version must be one of {sorted(PROTOCOL_VERSIONS)}")
        super().__init__(TerminalStage.IDLE, TerminalStage.FAILED, TmkOutOfOrder)
        self._module = module
        self._trust = trust
        self._clock = clock
        self._random = random
        self._random_size = random_size
        self._version = version
        self._rnd1 = b""
        self._challenge: ServerChallenge | None = None  # once it was verified
        self._server_key: PublicKey | None = None  # the work key it was verified with
        self._received: ServerChallenge | None = None

    @property
    def version(self) -> int:
        return self._version

    @property
    def session_id(self) -> str | None:
        return self._challenge.session_id if self._challenge else None

    @property
    def ticket(self) -> bytes | None:
        """The challenge's ticket, once a challenge was received (an abort carries it)."""
        return self._received.ticket if self._received else None

    def start(self) -> DownloadRequest:
        return self._step(TerminalStage.IDLE, TerminalStage.REQUESTED, self._request)

    def receive_challenge(self, challenge: ServerChallenge) -> TerminalProof:
        return self._step(
            TerminalStage.REQUESTED, TerminalStage.PROVED, lambda: self._answer(challenge)
        )

    def receive_delivery(self, delivery: KeyDelivery) -> Confirmation:
        return self._step(
            TerminalStage.PROVED, TerminalStage.CONFIRMED, lambda: self._install(delivery)
        )

    # -- steps ---------------------------------------------------------------------------

    def _request(self) -> DownloadRequest:
        self._rnd1 = self._random(self._random_size)
        return DownloadRequest(
            sn=self._module.sn, rnd1=self._rnd1, suite=self._module.suite, version=self._version
        )

    def _same_version(self, message: ServerChallenge | KeyDelivery) -> None:
        if message.version != self._version:
            raise TmkVersionMismatch(
                f"a version {message.version} {message.TYPE} answers a version"
                f" {self._version} request"
            )

    def _answer(self, challenge: ServerChallenge) -> TerminalProof:
        self._received = challenge
        self._same_version(challenge)  # an unsigned "v": TBS1's label says it again
        if challenge.rnd1 != self._rnd1:
            raise TmkReplay("the challenge answers another terminal's request")
        now = self._clock()
        if expired(challenge.expires_at, now):
            raise TmkSessionExpired()
        server_key = self._trust.verify(challenge.kswcrt_der, challenge.chain_der, now)
        tbs = server_auth_tbs(
            sn=self._module.sn,
            suite=self._module.suite,
            session_id=challenge.session_id,
            rnd1=self._rnd1,
            rnd2=challenge.rnd2,
            expires_at=challenge.expires_at,
            version=self._version,
        )
        if not _verifies(server_key, tbs, challenge.signature):
            raise TmkBadServerSignature()
        self._challenge = challenge
        self._server_key = server_key
        signature = self._module.sign_terminal_proof(
            session_id=challenge.session_id,
            rnd1=self._rnd1,
            rnd2=challenge.rnd2,
            version=self._version,
        )
        return TerminalProof(
            session_id=challenge.session_id,
            signature=signature,
            ticket=challenge.ticket,
            version=self._version,
        )

    def _install(self, delivery: KeyDelivery) -> Confirmation:
        challenge, server_key = self._challenge, self._server_key
        assert challenge is not None and server_key is not None
        self._same_version(delivery)
        if delivery.session_id != challenge.session_id:
            raise TmkReplay()
        if expired(challenge.expires_at, self._clock()):
            raise TmkSessionExpired()
        if _labels(self._version).key_delivery is not None:
            self._check_delivery_signature(challenge, server_key, delivery)
        self._module.install_tmk(
            session_id=challenge.session_id,
            rnd1=self._rnd1,
            rnd2=challenge.rnd2,
            algorithm=delivery.algorithm,
            wrapped_tmk=delivery.wrapped_tmk,
            kcv=delivery.kcv,
            version=self._version,
        )
        mac = self._module.confirmation_mac(
            session_id=challenge.session_id, kcv=delivery.kcv, version=self._version
        )
        return Confirmation(session_id=challenge.session_id, mac=mac, version=self._version)

    def _check_delivery_signature(
        self, challenge: ServerChallenge, server_key: PublicKey, delivery: KeyDelivery
    ) -> None:
        """TBS3 from the terminal's own values and the delivery's, under the work key the
        challenge was verified with: before TKP_Pr touches anything the delivery holds."""
        tbs = key_delivery_tbs(
            sn=self._module.sn,
            suite=self._module.suite,
            session_id=challenge.session_id,
            rnd1=self._rnd1,
            rnd2=challenge.rnd2,
            algorithm=delivery.algorithm,
            wrapped_tmk=delivery.wrapped_tmk,
            kcv=delivery.kcv,
            version=self._version,
        )
        if delivery.signature is None or not _verifies(server_key, tbs, delivery.signature):
            raise TmkBadDeliverySignature()


def _verifies(public_key: PublicKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the key server's over ``data`` (its scheme by its key)."""
    try:
        suite_for_algorithm(algorithm_of(public_key)).verify(public_key, data, signature)
    except TrustfleetError:
        return False
    return True


__all__ = [
    "DEFAULT_SESSION_TTL",
    "PROTOCOL_V1",
    "PROTOCOL_V2",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "SUPPORTED_SUITES",
    "TMK_ALGORITHMS",
    "Confirmation",
    "DownloadRequest",
    "KeyDelivery",
    "Message",
    "RegisteredTerminal",
    "ServerChallenge",
    "ServerSessionState",
    "ServerStage",
    "ServerTrust",
    "TerminalKeyModule",
    "TerminalProof",
    "TerminalSession",
    "TerminalStage",
    "TicketKey",
    "TmkActivated",
    "confirmation_data",
    "key_delivery_tbs",
    "keystore_kcv",
    "open_ticket",
    "parse_message",
    "require_version",
    "seal_ticket",
    "server_abort",
    "server_accept_proof",
    "server_auth_tbs",
    "server_confirm",
    "server_start",
    "terminal_auth_tbs",
    "transport_info",
    "validate_sn",
]
