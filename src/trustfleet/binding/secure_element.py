"""The secure element: an APDU-level applet over a non-volatile store.

``SecureElement.transmit(C-APDU bytes) -> R-APDU bytes`` is the whole interface a reader
sees; ``power_on`` / ``power_off`` / ``reset`` model the contacts. Everything that must
survive a power cut lives in the NV record (one atomic write per change); the selection,
the pending challenge, the verified flag and the session keys live in RAM and vanish at
every power cycle, which is what makes the host prove the binding again at each power-up.

Rules (``docs/binding-apdu.md`` has them per command):

* After BIND LOCK, REGISTER answers ``6985``; before it, REGISTER replaces the credential.
* A failed verification answers ``63Cx`` (``x`` tries left); with no tries left every
  verification command answers ``6983``. The counter is decremented in NV *before* the
  comparison and restored after a match, so cutting the power mid-check costs a try.
* The security services (PSO: COMPUTE DIGITAL SIGNATURE and GET DATA ``D1``) and BIND LOCK
  answer ``6982`` until the binding was verified in this power cycle; in mutual mode they
  must also come with a valid C-MAC (secure messaging), and a bad MAC closes the session.
* ADMIN RESET, a challenge-response under the issuer's per-SE key with its own counter, is
  the only way out of a lock or a block.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from trustfleet.binding import protocol as p
from trustfleet.binding.errors import (
    SeMalformedMessage,
    SeNvExists,
    SeNvUnreadable,
    SeTransportError,
    SeUnsupported,
)
from trustfleet.binding.protocol import Lifecycle, Mode, Random, SeStatus
from trustfleet.binding.storage import NvStore
from trustfleet.crypto.base import PrivateKey, PublicKey
from trustfleet.errors import CryptoError
from trustfleet.wire import tlv
from trustfleet.wire.apdu import (
    SW,
    CommandApdu,
    MalformedApdu,
    ResponseApdu,
    sw_tries_left,
)

#: T=1, no historical bytes
ATR = bytes.fromhex("3B80800101")
MAX_VERIFY_TRIES = 5
MAX_ADMIN_TRIES = 3
_MAGIC = b"TFSE"
_RECORD_VERSION = 1
_CHECK_SIZE = 8
_HEADER_SIZE = 9


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(value, validate=True)


# =====================================================================================
# Non-volatile state
# =====================================================================================


@dataclass(frozen=True)
class Personalisation:
    """What the issuer writes once: identity, reset key, service key, holder data."""

    se_id: bytes
    issuer_suite: str
    admin_key: bytes
    service_key: bytes  # private key, DER
    holder_data: bytes

    @cached_property
    def service_private_key(self) -> PrivateKey:
        return p.load_private_key_bytes(self.service_key)

    @cached_property
    def encoded(self) -> bytes:
        return _canonical(
            {
                "se_id": self.se_id.hex(),
                "issuer_suite": self.issuer_suite,
                "admin_key": _b64(self.admin_key),
                "service_key": _b64(self.service_key),
                "holder_data": _b64(self.holder_data),
            }
        )

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Personalisation:
        personal = cls(
            se_id=bytes.fromhex(obj["se_id"]),
            issuer_suite=str(obj["issuer_suite"]),
            admin_key=_unb64(obj["admin_key"]),
            service_key=_unb64(obj["service_key"]),
            holder_data=_unb64(obj["holder_data"]),
        )
        if len(personal.se_id) != p.SE_ID_SIZE:
            raise ValueError("bad SE ID")
        return personal


@dataclass(frozen=True)
class Binding:
    """The binding: replaced by REGISTER/PAIR, frozen by BIND LOCK, wiped by ADMIN RESET."""

    lifecycle: Lifecycle = Lifecycle.BLANK
    mode: Mode | None = None
    suite: str | None = None
    secret: bytes = b""
    device_id: str = ""

    @cached_property
    def se_private(self) -> PrivateKey:
        return p.load_private_key_bytes(self.secret)

    @cached_property
    def host_public(self) -> PublicKey:
        assert self.suite is not None
        return p.load_public_key_bytes(self.suite, self.secret)

    @cached_property
    def encoded(self) -> bytes:
        return _canonical(
            {
                "lifecycle": int(self.lifecycle),
                "mode": self.mode.value if self.mode else None,
                "suite": self.suite,
                "secret": _b64(self.secret),
                "device_id": self.device_id,
            }
        )

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Binding:
        return cls(
            lifecycle=Lifecycle(obj["lifecycle"]),
            mode=Mode(obj["mode"]) if obj["mode"] else None,
            suite=obj["suite"],
            secret=_unb64(obj["secret"]),
            device_id=str(obj["device_id"]),
        )


@dataclass(frozen=True)
class NvState:
    """The NV record. Encoded as ``TFSE || version || tries || admin tries ||
    len(P) on 2 bytes || P || B || SHA-256(all before)[:8]`` with P and B the canonical
    JSON of the personalisation and the binding. Both are frozen and cache their JSON, so
    a counter update (two per verification) costs no re-serialisation; a state caches its
    record, and the states that differ from it only in the try counter (what a
    verification writes and writes back) are made once."""

    personal: Personalisation
    binding: Binding
    tries_left: int = MAX_VERIFY_TRIES
    admin_tries_left: int = MAX_ADMIN_TRIES

    @property
    def service_key(self) -> PrivateKey:
        return self.personal.service_private_key

    def with_tries(self, tries_left: int) -> NvState:
        family = self._counter_family
        state = family.get(tries_left)
        if state is None:
            state = NvState(self.personal, self.binding, tries_left, self.admin_tries_left)
            state.__dict__["_counter_family"] = family
            family[tries_left] = state
        return state

    @cached_property
    def _counter_family(self) -> dict[int, NvState]:
        return {self.tries_left: self}

    @cached_property
    def record(self) -> bytes:
        """The encoded record (the state is immutable)."""
        return self.encode()

    def encode(self) -> bytes:
        personal = self.personal.encoded
        body = b"".join(
            (
                _MAGIC,
                bytes((_RECORD_VERSION, self.tries_left, self.admin_tries_left)),
                len(personal).to_bytes(2, "big"),
                personal,
                self.binding.encoded,
            )
        )
        return body + hashlib.sha256(body).digest()[:_CHECK_SIZE]

    @classmethod
    def decode(cls, record: bytes) -> NvState:
        body, check = record[:-_CHECK_SIZE], record[-_CHECK_SIZE:]
        if (
            len(record) < _HEADER_SIZE + _CHECK_SIZE
            or not body.startswith(_MAGIC)
            or body[4] != _RECORD_VERSION
            or hashlib.sha256(body).digest()[:_CHECK_SIZE] != check
        ):
            raise SeNvUnreadable("the SE's NV record is corrupt")
        split = _HEADER_SIZE + int.from_bytes(body[7:9], "big")
        personal_json, binding_json = body[_HEADER_SIZE:split], body[split:]
        try:
            personal = Personalisation.parse(json.loads(personal_json))
            binding = Binding.parse(json.loads(binding_json))
        except (KeyError, TypeError, ValueError):
            raise SeNvUnreadable("the SE's NV record does not parse") from None
        # what was read is what would be written: seed the encodings' caches with it
        personal.__dict__["encoded"] = personal_json
        binding.__dict__["encoded"] = binding_json
        state = cls(personal, binding, body[5], body[6])
        state.__dict__["record"] = record
        return state


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# =====================================================================================
# RAM state
# =====================================================================================


@dataclass
class _Ram:
    """Cleared at every power-up and reset."""

    selected: bool = False
    verified: bool = False
    challenge: bytes | None = None
    admin_challenge: bytes | None = None
    mutual: tuple[p.SessionKeys, bytes, bytes] | None = None  # keys, host ch, SE ch
    channel: p.SecureChannel | None = None
    pairing: tuple[Mode, str, str, PrivateKey] | None = None  # pending mutual REGISTER


class _Answer(Exception):
    """Internal: stop handling a command and answer this status word."""

    def __init__(self, sw: int) -> None:
        self.sw = sw


def _require(condition: bool, sw: int) -> None:
    if not condition:
        raise _Answer(sw)


# =====================================================================================
# The applet
# =====================================================================================


class SecureElement:
    """The binding applet. Make one with :meth:`manufacture`, then power it on."""

    def __init__(self, nv: NvStore, *, random: Random = os.urandom) -> None:
        self._nv = nv
        self._random = random
        self._state: NvState | None = None
        self._last_record: tuple[bytes, NvState] | None = None
        self._last_fci: tuple[NvState, bool, bytes] | None = None
        self._ram = _Ram()
        self._handlers = {
            (p.CLA_ISO, p.INS_SELECT): self._select,
            (p.CLA_ISO, p.INS_GET_DATA): self._get_data,
            (p.CLA_ISO, p.INS_GET_CHALLENGE): self._get_challenge,
            (p.CLA_ISO, p.INS_EXTERNAL_AUTHENTICATE): self._external_authenticate,
            (p.CLA_ISO, p.INS_PSO): self._sign,
            (p.CLA_PROPRIETARY, p.INS_REGISTER): self._register,
            (p.CLA_PROPRIETARY, p.INS_PAIR): self._pair,
            (p.CLA_PROPRIETARY, p.INS_BIND_LOCK): self._bind_lock,
            (p.CLA_PROPRIETARY, p.INS_INITIALIZE): self._initialize,
            (p.CLA_PROPRIETARY, p.INS_ADMIN_RESET): self._admin_reset,
        }

    # -- manufacture and power ---------------------------------------------------------

    @classmethod
    def manufacture(
        cls,
        nv: NvStore,
        *,
        issuer_key: bytes,
        issuer_suite: str = "p256",
        se_id: bytes | None = None,
        holder_data: bytes = b"",
        random: Random = os.urandom,
    ) -> SecureElement:
        """Personalise a blank SE: SE ID, reset key diversified from ``issuer_key``, and
        a service key of the issuer suite. Refuses an NV store that already holds one."""
        if nv.load() is not None:
            raise SeNvExists()
        se_id = se_id if se_id is not None else random(p.SE_ID_SIZE)
        if len(se_id) != p.SE_ID_SIZE:
            raise SeNvUnreadable(f"an SE ID is {p.SE_ID_SIZE} bytes")
        personal = Personalisation(
            se_id=se_id,
            issuer_suite=issuer_suite,
            admin_key=p.admin_key(issuer_suite, issuer_key, se_id),
            service_key=p.private_key_bytes(p.generate_key(issuer_suite)),
            holder_data=holder_data,
        )
        nv.store(NvState(personal, Binding()).encode())
        return cls(nv, random=random)

    @property
    def powered(self) -> bool:
        return self._state is not None

    def power_on(self) -> bytes:
        """Contacts powered: read NV, clear RAM, answer the ATR."""
        record = self._nv.load()
        if record is None:
            raise SeNvUnreadable("the SE has no NV record (not manufactured)")
        self._state = self._decoded(record)
        self._ram = _Ram()
        return ATR

    def _decoded(self, record: bytes) -> NvState:
        # NV is read at every power-up; the state is immutable, so when the record is the
        # one this object last wrote or read, its parse is reused (a chip reads NV in place).
        last = self._last_record
        if last is not None and last[0] == record:
            return last[1]
        state = NvState.decode(record)
        self._last_record = (record, state)
        return state

    def power_off(self) -> None:
        self._state = None
        self._ram = _Ram()

    def reset(self) -> bytes:
        self.power_off()
        return self.power_on()

    def _peek_state(self) -> NvState:
        """The NV state, read from the store when unpowered (like a label on the card)."""
        if self._state is not None:
            return self._state
        record = self._nv.load()
        if record is None:
            raise SeNvUnreadable("the SE has no NV record (not manufactured)")
        return NvState.decode(record)

    @property
    def se_id(self) -> bytes:
        return self._peek_state().personal.se_id

    def status(self) -> SeStatus:
        """What SELECT reports (also readable unpowered, for tests and tools)."""
        state = self._peek_state()
        binding = state.binding
        return SeStatus(
            se_id=state.personal.se_id,
            lifecycle=binding.lifecycle,
            mode=binding.mode,
            suite=binding.suite,
            tries_left=state.tries_left,
            admin_tries_left=state.admin_tries_left,
            verified=self._ram.verified,
        )

    # -- APDU in, APDU out -------------------------------------------------------------

    def transmit(self, raw: bytes) -> bytes:
        if self._state is None:
            raise SeTransportError("the SE is not powered")
        return self.process(raw).encode()

    def process(self, raw: bytes) -> ResponseApdu:
        try:
            cmd = CommandApdu.parse(raw)
        except MalformedApdu:
            return ResponseApdu.status(SW.WRONG_LENGTH)
        try:
            if cmd.cla == p.CLA_SECURE:
                return self._secured(cmd)
            return self._dispatch(cmd, secured=False)
        except _Answer as answer:
            return ResponseApdu.status(answer.sw)

    def _dispatch(self, cmd: CommandApdu, *, secured: bool) -> ResponseApdu:
        handler = self._handlers.get((cmd.cla, cmd.ins))
        if handler is None:
            known_cla = cmd.cla in (p.CLA_ISO, p.CLA_PROPRIETARY)
            raise _Answer(SW.INS_NOT_SUPPORTED if known_cla else SW.CLA_NOT_SUPPORTED)
        if cmd.ins != p.INS_SELECT:
            _require(self._ram.selected, SW.INS_NOT_SUPPORTED)
        return handler(cmd, secured)

    def _secured(self, cmd: CommandApdu) -> ResponseApdu:
        """CLA 84: a C-MAC'd command of the mutual session; its answer gets an R-MAC."""
        _require(self._ram.selected, SW.INS_NOT_SUPPORTED)
        channel = self._ram.channel
        _require(channel is not None and self._ram.verified, SW.SECURITY_STATUS_NOT_SATISFIED)
        assert channel is not None
        inner = channel.unwrap_command(cmd)
        if inner is None:
            self._close_session()
            raise _Answer(SW.SM_OBJECTS_INCORRECT)
        known = {p.INS_GET_DATA, p.INS_PSO, p.INS_BIND_LOCK}
        _require(inner.ins in known, SW.INS_NOT_SUPPORTED)
        cla = p.CLA_PROPRIETARY if inner.ins == p.INS_BIND_LOCK else p.CLA_ISO
        inner = CommandApdu(cla, inner.ins, inner.p1, inner.p2, inner.data, inner.le)
        try:
            answer = self._dispatch(inner, secured=True)
        except _Answer as refused:
            answer = ResponseApdu.status(refused.sw)
        return channel.wrap_response(answer)

    # -- state helpers -----------------------------------------------------------------

    def _nv_state(self) -> NvState:
        if self._state is None:
            raise SeTransportError("the SE is not powered")
        return self._state

    def _persist(self, state: NvState) -> None:
        """One atomic NV write; RAM follows NV only once the write is done."""
        record = state.record
        try:
            self._nv.store(record)
            self._last_record = (record, state)
        except OSError:
            self._state = NvState.decode(self._nv.load() or b"")
            raise _Answer(SW.MEMORY_FAILURE) from None
        self._state = state

    def _close_session(self) -> None:
        self._ram.verified = False
        self._ram.channel = None
        self._ram.mutual = None
        self._ram.challenge = None

    def _authorised(self, secured: bool) -> bool:
        """Verified in this power cycle, and over secure messaging in mutual mode."""
        if not self._ram.verified:
            return False
        return secured or self._nv_state().binding.mode is not Mode.MUTUAL

    # -- SELECT, GET DATA --------------------------------------------------------------

    def _select(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        _require(cmd.p1 == p.P1_SELECT_BY_AID and cmd.p2 in (0x00, 0x0C), SW.INCORRECT_P1P2)
        if cmd.data != p.AID:
            self._ram.selected = False
            raise _Answer(SW.FILE_NOT_FOUND)
        self._ram.selected = True
        return ResponseApdu(b"" if cmd.p2 == 0x0C else self._fci(), SW.OK)

    def _fci(self) -> bytes:
        """SELECT's FCI, made again only when the state it reports has changed."""
        state, verified = self._nv_state(), self._ram.verified
        made = self._last_fci
        if made is not None and made[0] is state and made[1] == verified:
            return made[2]
        fci = self.status().encode_fci()
        self._last_fci = (state, verified, fci)
        return fci

    def _get_data(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        tag = (cmd.p1 << 8) | cmd.p2
        state = self._nv_state()
        if tag == p.DO_HOLDER_DATA:
            _require(self._authorised(secured), SW.SECURITY_STATUS_NOT_SATISFIED)
            return ResponseApdu(state.personal.holder_data, SW.OK)
        public = {
            p.DO_SE_ID: lambda: state.personal.se_id,
            p.DO_STATUS: lambda: self.status().encode_status(),
            p.DO_SERVICE_PUBLIC_KEY: lambda: p.public_key_bytes(state.service_key.public_key()),
            p.DO_DEVICE_ID: lambda: state.binding.device_id.encode("utf-8"),
        }
        _require(tag in public, SW.REFERENCED_DATA_NOT_FOUND)
        if tag == p.DO_DEVICE_ID:
            _require(state.binding.lifecycle is not Lifecycle.BLANK, SW.REFERENCED_DATA_NOT_FOUND)
        return ResponseApdu(public[tag](), SW.OK)

    # -- registration ------------------------------------------------------------------

    def _register(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        state = self._nv_state()
        _require(state.binding.lifecycle is not Lifecycle.LOCKED, SW.CONDITIONS_NOT_SATISFIED)
        try:
            mode = Mode.from_code(cmd.p1)
            suite = p.suite_from_code(cmd.p2)
        except SeUnsupported:
            raise _Answer(SW.INCORRECT_P1P2) from None
        fields = self._register_fields(cmd.data)
        device_id = self._device_id(fields)
        self._close_session()
        self._ram.pairing = None
        if mode is Mode.MUTUAL:
            _require(p.TAG_R1 not in fields and p.TAG_PUBLIC_KEY not in fields, SW.INCORRECT_DATA)
            pairing_key = p.generate_key(suite)
            self._ram.pairing = (mode, suite, device_id, pairing_key)
            public = p.public_key_bytes(pairing_key.public_key())
            return ResponseApdu(tlv.encode(p.TAG_PUBLIC_KEY, public), SW.OK)
        secret, answer = self._new_secret(mode, suite, fields)
        self._store_binding(Binding(Lifecycle.REGISTERED, mode, suite, secret, device_id))
        return ResponseApdu(answer, SW.OK)

    def _register_fields(self, data: bytes) -> dict[int, bytes]:
        try:
            return tlv.decode_unique(data, p.REGISTER_TAGS)
        except MalformedApdu:
            raise _Answer(SW.INCORRECT_DATA) from None

    def _device_id(self, fields: dict[int, bytes]) -> str:
        raw = fields.get(p.DO_DEVICE_ID, b"")
        _require(1 <= len(raw) <= p.MAX_DEVICE_ID_SIZE, SW.INCORRECT_DATA)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Answer(SW.INCORRECT_DATA) from None

    def _new_secret(self, mode: Mode, suite: str, fields: dict[int, bytes]) -> tuple[bytes, bytes]:
        """(what the SE keeps, what it answers) for the non-mutual modes."""
        if mode in p.R1_SIZES:
            _require(p.TAG_PUBLIC_KEY not in fields, SW.INCORRECT_DATA)
            given = fields.get(p.TAG_R1)
            if given is not None:
                _require(len(given) == p.R1_SIZES[mode], SW.INCORRECT_DATA)
                return given, b""
            r1 = self._random(p.R1_SIZES[mode])
            return r1, tlv.encode(p.TAG_R1, r1)
        _require(p.TAG_R1 not in fields, SW.INCORRECT_DATA)
        if mode is Mode.ASYMMETRIC:
            _require(p.TAG_PUBLIC_KEY not in fields, SW.INCORRECT_DATA)
            key = p.generate_key(suite)
            public = p.public_key_bytes(key.public_key())
            return p.private_key_bytes(key), tlv.encode(p.TAG_PUBLIC_KEY, public)
        host_public = fields.get(p.TAG_PUBLIC_KEY)  # signature mode
        _require(host_public is not None, SW.INCORRECT_DATA)
        assert host_public is not None
        try:
            p.load_public_key_bytes(suite, host_public)
        except SeMalformedMessage:
            raise _Answer(SW.INCORRECT_DATA) from None
        return host_public, b""

    def _store_binding(self, binding: Binding) -> None:
        state = self._nv_state()
        self._persist(replace(state, binding=binding, tries_left=MAX_VERIFY_TRIES))

    def _pair(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        state = self._nv_state()
        _require(state.binding.lifecycle is not Lifecycle.LOCKED, SW.CONDITIONS_NOT_SATISFIED)
        pending, self._ram.pairing = self._ram.pairing, None  # single use
        _require(pending is not None, SW.CONDITIONS_NOT_SATISFIED)
        assert pending is not None
        mode, suite, device_id, key = pending
        try:
            wrapped = tlv.decode_unique(cmd.data, frozenset({p.TAG_WRAPPED_SECRET}))[
                p.TAG_WRAPPED_SECRET
            ]
        except (KeyError, MalformedApdu):
            raise _Answer(SW.INCORRECT_DATA) from None
        se_id = state.personal.se_id
        info = p.pairing_wrap_info(se_id, device_id.encode("utf-8"))
        try:
            secret = p.binding_suite(suite).kem_unwrap(key, wrapped, info)
        except CryptoError:
            raise _Answer(SW.INCORRECT_DATA) from None
        nonce = self._random(p.CHALLENGE_SIZE)
        pairing_public = p.public_key_bytes(key.public_key())
        k_bind = p.binding_key(suite, secret, se_id, nonce, pairing_public)
        self._store_binding(Binding(Lifecycle.REGISTERED, mode, suite, k_bind, device_id))
        confirmation = p.pairing_confirmation(suite, k_bind, se_id, nonce)
        answer = tlv.encode_all([(p.TAG_SE_NONCE, nonce), (p.TAG_CONFIRMATION, confirmation)])
        return ResponseApdu(answer, SW.OK)

    def _bind_lock(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        state = self._nv_state()
        _require(state.binding.lifecycle is not Lifecycle.BLANK, SW.CONDITIONS_NOT_SATISFIED)
        _require(self._authorised(secured), SW.SECURITY_STATUS_NOT_SATISFIED)
        if state.binding.lifecycle is not Lifecycle.LOCKED:
            self._persist(
                replace(state, binding=replace(state.binding, lifecycle=Lifecycle.LOCKED))
            )
        return ResponseApdu(b"", SW.OK)

    # -- verification ------------------------------------------------------------------

    def _get_challenge(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        state = self._nv_state()
        if cmd.p1 == p.P1_CHALLENGE_ADMIN:
            _require(state.admin_tries_left > 0, SW.AUTHENTICATION_METHOD_BLOCKED)
            self._ram.admin_challenge = self._random(p.CHALLENGE_SIZE)
            return ResponseApdu(self._ram.admin_challenge, SW.OK)
        _require(cmd.p1 == p.P1_CHALLENGE_BINDING and cmd.p2 == 0, SW.INCORRECT_P1P2)
        mode = self._verifiable_mode()
        _require(mode in p.CHALLENGE_MODES, SW.FUNCTION_NOT_SUPPORTED)
        self._close_session()
        self._ram.challenge = self._random(p.CHALLENGE_SIZES[mode])
        return ResponseApdu(self._ram.challenge, SW.OK)

    def _verifiable_mode(self) -> Mode:
        state = self._nv_state()
        _require(state.binding.lifecycle is not Lifecycle.BLANK, SW.CONDITIONS_NOT_SATISFIED)
        _require(state.tries_left > 0, SW.AUTHENTICATION_METHOD_BLOCKED)
        assert state.binding.mode is not None
        return state.binding.mode

    def _initialize(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        mode = self._verifiable_mode()
        _require(mode is Mode.MUTUAL, SW.FUNCTION_NOT_SUPPORTED)
        _require(len(cmd.data) == p.CHALLENGE_SIZE, SW.WRONG_LENGTH)
        self._close_session()
        binding, se_id = self._nv_state().binding, self.se_id
        assert binding.suite is not None
        host_ch, se_ch = cmd.data, self._random(p.CHALLENGE_SIZE)
        keys = p.session_keys(binding.suite, binding.secret, se_id, host_ch, se_ch)
        self._ram.mutual = (keys, host_ch, se_ch)
        card = p.cryptogram(binding.suite, keys, "card", se_id, host_ch, se_ch)
        return ResponseApdu(se_ch + card, SW.OK)

    def _external_authenticate(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        mode = self._verifiable_mode()
        pending_challenge, pending_mutual = self._ram.challenge, self._ram.mutual
        self._close_session()  # the challenge is single use, whatever happens next
        _require(
            pending_mutual is not None if mode is Mode.MUTUAL else pending_challenge is not None,
            SW.CONDITIONS_NOT_SATISFIED,
        )
        state = self._nv_state()
        self._persist(state.with_tries(state.tries_left - 1))  # before comparing
        if mode is Mode.MUTUAL:
            assert pending_mutual is not None
            ok = self._check_mutual(pending_mutual, cmd.data)
        else:
            assert pending_challenge is not None
            ok = self._check_response(mode, pending_challenge, cmd.data)
        if not ok:
            raise _Answer(sw_tries_left(self._nv_state().tries_left))
        self._persist(state.with_tries(MAX_VERIFY_TRIES))
        self._ram.verified = True
        return ResponseApdu(b"", SW.OK)

    def _check_response(self, mode: Mode, challenge: bytes, response: bytes) -> bool:
        binding, se_id = self._nv_state().binding, self.se_id
        suite = binding.suite
        assert suite is not None
        if mode is Mode.DIGEST:
            return p.same(p.digest_response(suite, binding.secret, se_id, challenge), response)
        if mode is Mode.CIPHER:
            return p.same(p.cipher_response(suite, binding.secret, se_id, challenge), response)
        if mode is Mode.ASYMMETRIC:
            recovered = p.asymmetric_recover(suite, binding.se_private, se_id, response)
            return p.same(challenge, recovered)
        return p.signature_valid(suite, binding.host_public, se_id, challenge, response)

    def _check_mutual(self, pending: tuple[p.SessionKeys, bytes, bytes], host: bytes) -> bool:
        keys, host_ch, se_ch = pending
        suite = self._nv_state().binding.suite
        assert suite is not None
        expected = p.cryptogram(suite, keys, "host", self.se_id, host_ch, se_ch)
        if not p.same(expected, host):
            return False
        self._ram.channel = p.SecureChannel(suite, keys)
        return True

    # -- services ----------------------------------------------------------------------

    def _sign(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        _require((cmd.p1 << 8) | cmd.p2 == p.P1P2_COMPUTE_SIGNATURE, SW.INCORRECT_P1P2)
        _require(self._authorised(secured), SW.SECURITY_STATUS_NOT_SATISFIED)
        _require(len(cmd.data) > 0, SW.WRONG_LENGTH)
        state = self._nv_state()
        suite = p.binding_suite(state.personal.issuer_suite)
        return ResponseApdu(suite.sign(state.service_key, cmd.data), SW.OK)

    # -- authorised reset --------------------------------------------------------------

    def _admin_reset(self, cmd: CommandApdu, secured: bool) -> ResponseApdu:
        state = self._nv_state()
        _require(state.admin_tries_left > 0, SW.AUTHENTICATION_METHOD_BLOCKED)
        challenge, self._ram.admin_challenge = self._ram.admin_challenge, None
        _require(challenge is not None, SW.CONDITIONS_NOT_SATISFIED)
        assert challenge is not None
        self._persist(replace(state, admin_tries_left=state.admin_tries_left - 1))
        personal = state.personal
        expected = p.admin_cryptogram(
            personal.issuer_suite, personal.admin_key, personal.se_id, challenge
        )
        if not p.same(expected, cmd.data):
            raise _Answer(sw_tries_left(self._nv_state().admin_tries_left))
        self._close_session()
        self._persist(NvState(personal, Binding()))
        return ResponseApdu(b"", SW.OK)
