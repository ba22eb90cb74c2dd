"""SE binding, sans-I/O: the APDU command set, data formats and both roles' cryptography.

Nothing here does I/O or reads a clock; randomness is a parameter (``random(n) -> bytes``).
The applet (:mod:`trustfleet.binding.secure_element`) and the host library
(:mod:`trustfleet.binding.host`) drive these pieces; ``docs/binding-apdu.md`` is the
reference a card vendor builds from.

Host-side flows are single-use objects with ``start() -> CommandApdu`` and
``receive(ResponseApdu) -> CommandApdu | <outcome>``: the caller transmits each command
and feeds back the answer until an outcome comes out.

Every MAC, cryptogram and key derivation input starts with a label from :data:`LABELS`
followed by a zero byte and the 16-byte SE ID; the fields after it have fixed lengths,
so no two constructions (or two SEs) can ever share an input.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from cryptography.hazmat.primitives.asymmetric import ec

from trustfleet.binding.errors import (
    SeAlreadyLocked,
    SeBlocked,
    SeCardCryptogramInvalid,
    SeMalformedMessage,
    SeNotSelected,
    SeNotVerified,
    SePairingFailed,
    SeRefused,
    SeSecureMessagingFailed,
    SeUnsupported,
    SeVerificationFailed,
)
from trustfleet.crypto import (
    SM2PrivateKey,
    SM2PublicKey,
    get_suite,
    load_private_key,
    private_key_to_der,
)
from trustfleet.crypto.base import PrivateKey, PublicKey, Suite
from trustfleet.errors import CryptoError
from trustfleet.wire import tlv
from trustfleet.wire.apdu import SW, CommandApdu, MalformedApdu, ResponseApdu, tries_left_of

__all__ = ["CommandApdu", "ResponseApdu"]  # re-exported for callers building APDUs

Random = Callable[[int], bytes]

#: the applet's AID: proprietary RID F0 + "tfSEB" + version 01
AID = bytes.fromhex("F0746653454201")
VERSION = 1
SE_ID_SIZE = 16
CHALLENGE_SIZE = 16
MAX_DEVICE_ID_SIZE = 64
CMAC_SIZE = 16
SM_MAC_SIZE = 8

# -- classes and instructions ---------------------------------------------------------
CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80
CLA_SECURE = 0x84  # proprietary class with secure messaging (C-MAC and R-MAC)

INS_SELECT = 0xA4
INS_GET_DATA = 0xCA
INS_GET_CHALLENGE = 0x84
INS_EXTERNAL_AUTHENTICATE = 0x82
INS_PSO = 0x2A
INS_REGISTER = 0x10
INS_PAIR = 0x12
INS_BIND_LOCK = 0x14
INS_ADMIN_RESET = 0x1E
INS_INITIALIZE = 0x50

P1_SELECT_BY_AID = 0x04
P1_CHALLENGE_BINDING = 0x00
P1_CHALLENGE_ADMIN = 0x01
P1P2_COMPUTE_SIGNATURE = 0x9E9A

# -- data objects (GET DATA P1P2 and TLV tags) -----------------------------------------
TAG_FCI = 0x6F
TAG_AID = 0x84
DO_SE_ID = 0xC0
DO_STATUS = 0xC1
DO_DEVICE_ID = 0xC2
DO_SERVICE_PUBLIC_KEY = 0xC3
TAG_R1 = 0xC4
TAG_PUBLIC_KEY = 0xC5
TAG_WRAPPED_SECRET = 0xC6
TAG_SE_NONCE = 0xC7
TAG_CONFIRMATION = 0xC8
DO_HOLDER_DATA = 0xD1  # protected: a security service

REGISTER_TAGS = frozenset({DO_DEVICE_ID, TAG_R1, TAG_PUBLIC_KEY})

LABELS = {
    "digest": b"TF-SEB-v1 digest response",
    "cipher": b"TF-SEB-v1 cipher response",
    "asymmetric": b"TF-SEB-v1 asymmetric challenge",
    "signature": b"TF-SEB-v1 signature response",
    "pairing-secret": b"TF-SEB-v1 mutual pairing secret",
    "binding-key": b"TF-SEB-v1 mutual binding key",
    "pairing-confirmation": b"TF-SEB-v1 mutual pairing confirmation",
    "session-keys": b"TF-SEB-v1 mutual session keys",
    "card-cryptogram": b"TF-SEB-v1 card cryptogram",
    "host-cryptogram": b"TF-SEB-v1 host cryptogram",
    "admin-key": b"TF-SEB-v1 admin key",
    "admin-reset": b"TF-SEB-v1 admin reset",
}


def labelled(label: str, se_id: bytes, *fields: bytes) -> bytes:
    """``label || 00 || SE ID || fields...``: the input of every MAC, cryptogram and KDF."""
    return LABELS[label] + b"\x00" + se_id + b"".join(fields)


# =====================================================================================
# Modes, suites, lifecycle, status
# =====================================================================================


class Mode(StrEnum):
    DIGEST = "digest"
    CIPHER = "cipher"
    ASYMMETRIC = "asymmetric"
    SIGNATURE = "signature"
    MUTUAL = "mutual"

    @property
    def code(self) -> int:
        return _MODE_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Mode:
        mode = _MODES_BY_CODE.get(code)
        if mode is None:
            raise SeUnsupported(f"unknown binding mode code {code:#04x}")
        return mode


_MODE_CODES = {
    Mode.DIGEST: 0x01,
    Mode.CIPHER: 0x02,
    Mode.ASYMMETRIC: 0x03,
    Mode.SIGNATURE: 0x04,
    Mode.MUTUAL: 0x05,
}
_MODES_BY_CODE = {code: mode for mode, code in _MODE_CODES.items()}

#: binding suites by name -> P2 code; "p256" is the international suite
SUITE_CODES = {"p256": 0x01, "gm": 0x02}
#: the challenge-response modes (GET CHALLENGE + EXTERNAL AUTHENTICATE)
CHALLENGE_MODES = frozenset({Mode.DIGEST, Mode.CIPHER, Mode.ASYMMETRIC, Mode.SIGNATURE})


_SUITES_BY_CODE = {code: name for name, code in SUITE_CODES.items()}
_BINDING_SUITES = {name: get_suite(name) for name in SUITE_CODES}


def binding_suite(name: str) -> Suite:
    suite = _BINDING_SUITES.get(name)
    if suite is None:
        raise SeUnsupported(f"binding suites are {', '.join(SUITE_CODES)}, not {name!r}")
    return suite


def suite_from_code(code: int) -> str:
    name = _SUITES_BY_CODE.get(code)
    if name is None:
        raise SeUnsupported(f"unknown binding suite code {code:#04x}")
    return name


STATUS_SIZE = 7
_AID_TLV = bytes((TAG_AID, len(AID))) + AID
_FCI_PREFIX = bytes((TAG_FCI, len(_AID_TLV) + 2 + SE_ID_SIZE + 2 + STATUS_SIZE))
_FCI_PREFIX += _AID_TLV + bytes((DO_SE_ID, SE_ID_SIZE))
_FCI_STATUS_AT = len(_FCI_PREFIX) + SE_ID_SIZE
_FCI_STATUS_HEAD = bytes((DO_STATUS, STATUS_SIZE))
_FCI_SIZE = _FCI_STATUS_AT + 2 + STATUS_SIZE


class Lifecycle(IntEnum):
    BLANK = 0x00
    REGISTERED = 0x01
    LOCKED = 0x02


@dataclass(frozen=True, slots=True)
class SeStatus:
    """What SELECT (and GET DATA C1) tells anyone about the SE; nothing secret."""

    se_id: bytes
    lifecycle: Lifecycle
    mode: Mode | None
    suite: str | None
    tries_left: int
    admin_tries_left: int
    verified: bool

    def encode_status(self) -> bytes:
        return bytes(
            (
                VERSION,
                self.lifecycle,
                self.mode.code if self.mode else 0,
                SUITE_CODES[self.suite] if self.suite else 0,
                self.tries_left,
                self.admin_tries_left,
                int(self.verified),
            )
        )

    def encode_fci(self) -> bytes:
        inner = _AID_TLV + tlv.encode(DO_SE_ID, self.se_id)
        return tlv.encode(TAG_FCI, inner + tlv.encode(DO_STATUS, self.encode_status()))

    @classmethod
    def parse_fci(cls, data: bytes) -> SeStatus:
        # The layout this applet answers, checked byte for byte, is read in place; any
        # other (another order of the same objects, say) goes through the full decoder.
        if (
            len(data) == _FCI_SIZE
            and data.startswith(_FCI_PREFIX)
            and data[_FCI_STATUS_AT : _FCI_STATUS_AT + 2] == _FCI_STATUS_HEAD
        ):
            se_id = data[len(_FCI_PREFIX) : _FCI_STATUS_AT]
            return cls.parse_status(se_id, data[_FCI_STATUS_AT + 2 :])
        try:
            outer = tlv.decode_unique(data, frozenset({TAG_FCI}))
            inner = tlv.decode_unique(outer[TAG_FCI], frozenset({TAG_AID, DO_SE_ID, DO_STATUS}))
            return cls.parse_status(inner[DO_SE_ID], inner[DO_STATUS])
        except (KeyError, MalformedApdu):
            raise SeMalformedMessage("the SELECT answer is not a binding applet FCI") from None

    @classmethod
    def parse_status(cls, se_id: bytes, status: bytes) -> SeStatus:
        if len(se_id) != SE_ID_SIZE or len(status) != STATUS_SIZE or status[0] != VERSION:
            raise SeMalformedMessage("the SE status object is malformed")
        try:
            lifecycle = Lifecycle(status[1])
            mode = Mode.from_code(status[2]) if status[2] else None
            suite = suite_from_code(status[3]) if status[3] else None
        except (ValueError, SeUnsupported):
            raise SeMalformedMessage("the SE status object has unknown values") from None
        return cls(se_id, lifecycle, mode, suite, status[4], status[5], bool(status[6]))


# =====================================================================================
# Key encodings (public keys cross the bus as uncompressed points)
# =====================================================================================


def public_key_bytes(key: PublicKey) -> bytes:
    if isinstance(key, SM2PublicKey):
        return key.public_bytes()
    if isinstance(key, ec.EllipticCurvePublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    raise SeUnsupported(f"binding keys are P-256 or SM2, not {type(key).__name__}")


def load_public_key_bytes(suite: str, data: bytes) -> PublicKey:
    """An uncompressed P-256 or SM2 point; SeMalformedMessage if it is not on the curve."""
    try:
        if suite == "gm":
            return SM2PublicKey.from_bytes(data)
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except (ValueError, CryptoError):
        raise SeMalformedMessage("the public key is not a valid point") from None


def private_key_bytes(key: PrivateKey) -> bytes:
    return private_key_to_der(key)


def load_private_key_bytes(data: bytes) -> PrivateKey:
    return load_private_key(data)


def generate_key(suite: str) -> PrivateKey:
    """A P-256 (ECDH/ECDSA/HPKE) or SM2 key pair, by binding suite."""
    if suite == "gm":
        return SM2PrivateKey.generate()
    return binding_suite(suite).generate_kem_key()


# =====================================================================================
# The constructions (both roles compute the same values)
# =====================================================================================

R1_SIZES = {Mode.DIGEST: 32, Mode.CIPHER: 16}
CHALLENGE_SIZES = {
    Mode.DIGEST: 32,
    Mode.CIPHER: 16,
    Mode.ASYMMETRIC: 32,
    Mode.SIGNATURE: 32,
}


def digest_response(suite: str, r1: bytes, se_id: bytes, r2: bytes) -> bytes:
    """digest mode: HMAC-SHA256 / HMAC-SM3 keyed with R1 over the labelled R2."""
    return binding_suite(suite).mac(r1, labelled("digest", se_id, r2))


def cipher_response(suite: str, r1: bytes, se_id: bytes, r2: bytes) -> bytes:
    """cipher mode: AES-128-CMAC / SM4-CMAC keyed with R1 over the labelled R2."""
    return binding_suite(suite).cmac(r1, labelled("cipher", se_id, r2))


def asymmetric_response(suite: str, se_public: PublicKey, se_id: bytes, r: bytes) -> bytes:
    """asymmetric mode: R' encrypted to the SE's key (HPKE P-256 = ECIES, or SM2)."""
    return binding_suite(suite).kem_wrap(se_public, r, labelled("asymmetric", se_id))


def asymmetric_recover(suite: str, se_private: PrivateKey, se_id: bytes, c: bytes) -> bytes | None:
    try:
        return binding_suite(suite).kem_unwrap(se_private, c, labelled("asymmetric", se_id))
    except CryptoError:
        return None


def signature_response(suite: str, host_private: PrivateKey, se_id: bytes, r2: bytes) -> bytes:
    """signature mode: the host signs the labelled R2 (ECDSA P-256 / SM2)."""
    return binding_suite(suite).sign(host_private, labelled("signature", se_id, r2))


def signature_valid(
    suite: str, host_public: PublicKey, se_id: bytes, r2: bytes, signature: bytes
) -> bool:
    try:
        binding_suite(suite).verify(host_public, labelled("signature", se_id, r2), signature)
    except CryptoError:
        return False
    return True


def pairing_wrap_info(se_id: bytes, device_id: bytes) -> bytes:
    return labelled("pairing-secret", se_id, device_id)


def binding_key(
    suite: str, secret: bytes, se_id: bytes, se_nonce: bytes, pairing_public: bytes
) -> bytes:
    """mutual mode: K_bind = KDF(pairing secret, salt = SE nonce, labelled SE pairing key)."""
    info = labelled("binding-key", se_id, pairing_public)
    return binding_suite(suite).kdf(secret, salt=se_nonce, info=info, length=32)


def pairing_confirmation(suite: str, k_bind: bytes, se_id: bytes, se_nonce: bytes) -> bytes:
    mac = binding_suite(suite).mac(k_bind, labelled("pairing-confirmation", se_id, se_nonce))
    return mac[:CMAC_SIZE]


@dataclass(frozen=True, slots=True, repr=False)
class SessionKeys:
    k_crypt: bytes
    s_mac: bytes
    s_rmac: bytes


def session_keys(
    suite: str, k_bind: bytes, se_id: bytes, host_ch: bytes, se_ch: bytes
) -> SessionKeys:
    okm = binding_suite(suite).kdf(
        k_bind, salt=host_ch + se_ch, info=labelled("session-keys", se_id), length=48
    )
    return SessionKeys(okm[:16], okm[16:32], okm[32:])


def cryptogram(
    suite: str, keys: SessionKeys, who: str, se_id: bytes, host_ch: bytes, se_ch: bytes
) -> bytes:
    """The card's or the host's cryptogram: CMAC(K_crypt, labelled both challenges)."""
    return binding_suite(suite).cmac(
        keys.k_crypt, labelled(f"{who}-cryptogram", se_id, host_ch, se_ch)
    )


def admin_key(issuer_suite: str, issuer_key: bytes, se_id: bytes) -> bytes:
    """The SE's reset key, diversified from the issuer's master key by SE ID."""
    info = labelled("admin-key", se_id)
    return binding_suite(issuer_suite).kdf(issuer_key, salt=b"", info=info, length=16)


def admin_cryptogram(issuer_suite: str, k_admin: bytes, se_id: bytes, challenge: bytes) -> bytes:
    return binding_suite(issuer_suite).cmac(k_admin, labelled("admin-reset", se_id, challenge))


def same(a: bytes, b: bytes | None) -> bool:
    return b is not None and hmac.compare_digest(a, b)


# =====================================================================================
# Secure messaging (mutual mode, after verification)
# =====================================================================================


class SecureChannel:
    """C-MAC on every command and R-MAC on every successful answer, chained.

    ``C-MAC = CMAC(S_MAC, chain || CLA INS P1 P2 || len(data || C-MAC) on 2 bytes || data)``;
    its first 8 bytes travel after the data, all 16 become the next chain value.
    ``R-MAC = CMAC(S_RMAC, chain || answer data || SW)[:8]`` travels after the answer
    data. The chain starts at 16 zero bytes; both roles advance it on every command, so a
    replayed, reordered or dropped command breaks every later MAC.
    """

    __slots__ = ("_chain", "_keys", "_suite")

    def __init__(self, suite: str, keys: SessionKeys) -> None:
        self._suite = binding_suite(suite)
        self._keys = keys
        self._chain = bytes(CMAC_SIZE)

    def _command_mac(self, cmd: CommandApdu, data: bytes) -> bytes:
        length = (len(data) + SM_MAC_SIZE).to_bytes(2, "big")
        return self._suite.cmac(self._keys.s_mac, self._chain + cmd.header + length + data)

    def _response_mac(self, data: bytes, sw: int) -> bytes:
        return self._suite.cmac(self._keys.s_rmac, self._chain + data + sw.to_bytes(2, "big"))

    # -- host role ---------------------------------------------------------------------

    def wrap_command(self, cmd: CommandApdu) -> CommandApdu:
        secured = CommandApdu(CLA_SECURE, cmd.ins, cmd.p1, cmd.p2)
        mac = self._command_mac(secured, cmd.data)
        self._chain = mac
        data = cmd.data + mac[:SM_MAC_SIZE]
        return CommandApdu(CLA_SECURE, cmd.ins, cmd.p1, cmd.p2, data, cmd.le)

    def unwrap_response(self, resp: ResponseApdu) -> ResponseApdu:
        if resp.sw != SW.OK:
            return resp
        if len(resp.data) < SM_MAC_SIZE:
            raise SeSecureMessagingFailed("the answer carries no R-MAC")
        data, mac = resp.data[:-SM_MAC_SIZE], resp.data[-SM_MAC_SIZE:]
        if not same(self._response_mac(data, resp.sw)[:SM_MAC_SIZE], mac):
            raise SeSecureMessagingFailed()
        return ResponseApdu(data, resp.sw)

    # -- SE role -----------------------------------------------------------------------

    def unwrap_command(self, cmd: CommandApdu) -> CommandApdu | None:
        """The command without its C-MAC, or None if the MAC is missing or wrong."""
        if len(cmd.data) < SM_MAC_SIZE:
            return None
        data, mac = cmd.data[:-SM_MAC_SIZE], cmd.data[-SM_MAC_SIZE:]
        full = self._command_mac(cmd, data)
        if not same(full[:SM_MAC_SIZE], mac):
            return None
        self._chain = full
        return CommandApdu(CLA_ISO, cmd.ins, cmd.p1, cmd.p2, data, cmd.le)

    def wrap_response(self, resp: ResponseApdu) -> ResponseApdu:
        if resp.sw != SW.OK:
            return resp
        mac = self._response_mac(resp.data, resp.sw)
        return ResponseApdu(resp.data + mac[:SM_MAC_SIZE], resp.sw)


# =====================================================================================
# Host role
# =====================================================================================


@dataclass(frozen=True, slots=True, repr=False)
class Credential:
    """What the host keeps per SE. ``secret`` is R1 (digest, cipher), the SE's public key
    (asymmetric: secret by the spec's own logic), the host's private key (signature) or
    K_bind (mutual)."""

    se_id: bytes
    device_id: str
    mode: Mode
    suite: str
    secret: bytes

    def __repr__(self) -> str:
        return f"<Credential {self.mode.value}/{self.suite} se={self.se_id.hex()} (secret)>"


def select_command() -> CommandApdu:
    return _SELECT


_SELECT = CommandApdu(CLA_ISO, INS_SELECT, P1_SELECT_BY_AID, 0x00, AID, 256)


def get_data_command(tag: int) -> CommandApdu:
    return CommandApdu(CLA_ISO, INS_GET_DATA, tag >> 8, tag & 0xFF, b"", 256)


def sign_command(data: bytes) -> CommandApdu:
    p1, p2 = P1P2_COMPUTE_SIGNATURE >> 8, P1P2_COMPUTE_SIGNATURE & 0xFF
    return CommandApdu(CLA_ISO, INS_PSO, p1, p2, data, 256)


def lock_command() -> CommandApdu:
    return CommandApdu(CLA_PROPRIETARY, INS_BIND_LOCK, 0, 0)


_REFUSALS: dict[int, type[SeRefused]] = {
    SW.AUTHENTICATION_METHOD_BLOCKED: SeBlocked,
    SW.SECURITY_STATUS_NOT_SATISFIED: SeNotVerified,
    SW.FILE_NOT_FOUND: SeNotSelected,
}


def raise_for_status(resp: ResponseApdu, what: str) -> None:
    """Turn a refusal into the host's typed error."""
    sw = resp.sw
    if sw == SW.OK:
        return
    tries = tries_left_of(sw)
    if tries is not None:
        raise SeVerificationFailed(f"{what}: {tries} tries left", sw=sw, tries_left=tries)
    error = _REFUSALS.get(sw, SeRefused)
    if sw == SW.CONDITIONS_NOT_SATISFIED and what == "register":
        error = SeAlreadyLocked
    raise error(f"{what}: SE answered {sw:04X}", sw=sw)


def parse_register_answer(data: bytes) -> dict[int, bytes]:
    try:
        return tlv.decode_unique(data, frozenset({TAG_R1, TAG_PUBLIC_KEY}))
    except MalformedApdu:
        raise SeMalformedMessage("the REGISTER answer is malformed") from None


class HostRegistration:
    """REGISTER (and PAIR in mutual mode): ends with the :class:`Credential` to store."""

    def __init__(
        self,
        *,
        se_id: bytes,
        device_id: str,
        mode: Mode,
        suite: str,
        r1_from_host: bool = False,
        random: Random,
    ) -> None:
        binding_suite(suite)
        device = device_id.encode("utf-8")
        if not 1 <= len(device) <= MAX_DEVICE_ID_SIZE:
            raise SeMalformedMessage(f"a device ID is 1..{MAX_DEVICE_ID_SIZE} UTF-8 bytes")
        if r1_from_host and mode not in R1_SIZES:
            raise SeUnsupported(f"the host supplies R1 only in digest and cipher modes, not {mode}")
        self._se_id, self._device_id, self._device = se_id, device_id, device
        self._mode, self._suite, self._random = mode, suite, random
        self._r1 = random(R1_SIZES[mode]) if r1_from_host else None
        self._host_key: PrivateKey | None = None
        self._pairing: tuple[bytes, bytes] | None = None  # (secret, SE pairing public key)
        self._done = False

    def start(self) -> CommandApdu:
        items = [(DO_DEVICE_ID, self._device)]
        if self._r1 is not None:
            items.append((TAG_R1, self._r1))
        if self._mode is Mode.SIGNATURE:
            self._host_key = generate_key(self._suite)
            items.append((TAG_PUBLIC_KEY, public_key_bytes(self._host_key.public_key())))
        data = tlv.encode_all(items)
        return CommandApdu(
            CLA_PROPRIETARY, INS_REGISTER, self._mode.code, SUITE_CODES[self._suite], data, 256
        )

    def receive(self, resp: ResponseApdu) -> CommandApdu | Credential:
        if self._done:
            raise SeMalformedMessage("this registration is already finished")
        if self._pairing is not None:
            return self._finish_pairing(resp)
        raise_for_status(resp, "register")
        answer = parse_register_answer(resp.data)
        if self._mode is Mode.MUTUAL:
            return self._pair_command(answer)
        self._done = True
        return self._credential(self._secret_from(answer))

    def _secret_from(self, answer: dict[int, bytes]) -> bytes:
        if self._mode in R1_SIZES:
            r1 = self._r1 if self._r1 is not None else answer.get(TAG_R1)
            if r1 is None or len(r1) != R1_SIZES[self._mode]:
                raise SeMalformedMessage("the SE sent no R1 of the mode's length")
            return r1
        if self._mode is Mode.ASYMMETRIC:
            public = answer.get(TAG_PUBLIC_KEY, b"")
            load_public_key_bytes(self._suite, public)
            return public
        assert self._host_key is not None
        return private_key_bytes(self._host_key)

    def _pair_command(self, answer: dict[int, bytes]) -> CommandApdu:
        pairing_public = answer.get(TAG_PUBLIC_KEY, b"")
        se_key = load_public_key_bytes(self._suite, pairing_public)
        secret = self._random(32)
        info = pairing_wrap_info(self._se_id, self._device)
        wrapped = binding_suite(self._suite).kem_wrap(se_key, secret, info)
        self._pairing = (secret, pairing_public)
        data = tlv.encode(TAG_WRAPPED_SECRET, wrapped)
        return CommandApdu(CLA_PROPRIETARY, INS_PAIR, 0, 0, data, 256)

    def _finish_pairing(self, resp: ResponseApdu) -> Credential:
        self._done = True
        raise_for_status(resp, "pair")
        assert self._pairing is not None
        secret, pairing_public = self._pairing
        try:
            answer = tlv.decode_unique(resp.data, frozenset({TAG_SE_NONCE, TAG_CONFIRMATION}))
            nonce, confirmation = answer[TAG_SE_NONCE], answer[TAG_CONFIRMATION]
        except (KeyError, MalformedApdu):
            raise SeMalformedMessage("the PAIR answer is malformed") from None
        k_bind = binding_key(self._suite, secret, self._se_id, nonce, pairing_public)
        if not same(pairing_confirmation(self._suite, k_bind, self._se_id, nonce), confirmation):
            raise SePairingFailed()
        return self._credential(k_bind)

    def _credential(self, secret: bytes) -> Credential:
        return Credential(self._se_id, self._device_id, self._mode, self._suite, secret)


@dataclass(frozen=True, slots=True)
class Verified:
    """A verification succeeded; in mutual mode ``channel`` MACs every later command."""

    channel: SecureChannel | None


# A host verifies with the same credential at every power-up; parsing (and validating) its
# key costs more than using it, so the parse is kept for the few credentials a host holds.
@functools.lru_cache(maxsize=16)
def _parsed_public_key(suite: str, data: bytes) -> PublicKey:
    return load_public_key_bytes(suite, data)


@functools.lru_cache(maxsize=16)
def _parsed_private_key(data: bytes) -> PrivateKey:
    return load_private_key_bytes(data)


class HostVerification:
    """One power-up verification with a stored credential. Single use."""

    def __init__(self, credential: Credential, *, random: Random) -> None:
        self._cred = credential
        self._random = random
        self._host_challenge: bytes | None = None
        self._keys: SessionKeys | None = None
        self._stage = "new"

    def start(self) -> CommandApdu:
        if self._stage != "new":
            raise SeMalformedMessage("a verification is single-use")
        self._stage = "challenge"
        if self._cred.mode is Mode.MUTUAL:
            self._host_challenge = self._random(CHALLENGE_SIZE)
            return CommandApdu(CLA_PROPRIETARY, INS_INITIALIZE, 0, 0, self._host_challenge, 256)
        return CommandApdu(CLA_ISO, INS_GET_CHALLENGE, P1_CHALLENGE_BINDING, 0, b"", 256)

    def receive(self, resp: ResponseApdu) -> CommandApdu | Verified:
        if self._stage == "challenge":
            self._stage = "answer"
            raise_for_status(resp, "challenge")
            return self._external_authenticate(self._answer(resp.data))
        if self._stage == "answer":
            self._stage = "done"
            raise_for_status(resp, "verify")
            keys = self._keys
            return Verified(SecureChannel(self._cred.suite, keys) if keys else None)
        raise SeMalformedMessage("this verification is already finished")

    def _external_authenticate(self, data: bytes) -> CommandApdu:
        return CommandApdu(CLA_ISO, INS_EXTERNAL_AUTHENTICATE, 0, 0, data)

    def _answer(self, challenge: bytes) -> bytes:
        cred, se_id = self._cred, self._cred.se_id
        if cred.mode is Mode.MUTUAL:
            return self._mutual_answer(challenge)
        if len(challenge) != CHALLENGE_SIZES[cred.mode]:
            raise SeMalformedMessage("the SE's challenge has the wrong length")
        if cred.mode is Mode.DIGEST:
            return digest_response(cred.suite, cred.secret, se_id, challenge)
        if cred.mode is Mode.CIPHER:
            return cipher_response(cred.suite, cred.secret, se_id, challenge)
        if cred.mode is Mode.ASYMMETRIC:
            public = _parsed_public_key(cred.suite, cred.secret)
            return asymmetric_response(cred.suite, public, se_id, challenge)
        private = _parsed_private_key(cred.secret)
        return signature_response(cred.suite, private, se_id, challenge)

    def _mutual_answer(self, data: bytes) -> bytes:
        cred, host_ch = self._cred, self._host_challenge
        assert host_ch is not None
        if len(data) != CHALLENGE_SIZE + CMAC_SIZE:
            raise SeMalformedMessage("the INITIALIZE answer has the wrong length")
        se_ch, card = data[:CHALLENGE_SIZE], data[CHALLENGE_SIZE:]
        keys = session_keys(cred.suite, cred.secret, cred.se_id, host_ch, se_ch)
        expected = cryptogram(cred.suite, keys, "card", cred.se_id, host_ch, se_ch)
        if not same(expected, card):
            raise SeCardCryptogramInvalid()
        self._keys = keys
        return cryptogram(cred.suite, keys, "host", cred.se_id, host_ch, se_ch)


class HostAdminReset:
    """The issuer's authorised reset: GET CHALLENGE (admin) then ADMIN RESET."""

    def __init__(self, *, se_id: bytes, issuer_suite: str, issuer_key: bytes) -> None:
        self._se_id = se_id
        self._suite = issuer_suite
        self._key = admin_key(issuer_suite, issuer_key, se_id)
        self._stage = "new"

    def start(self) -> CommandApdu:
        self._stage = "challenge"
        return CommandApdu(CLA_ISO, INS_GET_CHALLENGE, P1_CHALLENGE_ADMIN, 0, b"", CHALLENGE_SIZE)

    def receive(self, resp: ResponseApdu) -> CommandApdu | None:
        if self._stage == "challenge":
            self._stage = "reset"
            raise_for_status(resp, "admin challenge")
            if len(resp.data) != CHALLENGE_SIZE:
                raise SeMalformedMessage("the admin challenge has the wrong length")
            mac = admin_cryptogram(self._suite, self._key, self._se_id, resp.data)
            return CommandApdu(CLA_PROPRIETARY, INS_ADMIN_RESET, 0, 0, mac)
        self._stage = "done"
        raise_for_status(resp, "admin reset")
        return None
