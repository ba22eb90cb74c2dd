"""The host side of SE binding: its credential store and its power-up logic.

A host keeps one :class:`~trustfleet.binding.protocol.Credential` per SE it has bound, in
an encrypted file (AES-256-GCM under a key derived from a 32-byte *host key* file), and on
every power-up runs :meth:`Host.power_up`:

* SE blank (new, or reset by its issuer), or registered but unknown to this host: register
  in the configured mode, store the credential, verify once, then BIND LOCK;
* SE known: verify (``63Cx`` / ``6983`` end the power-up with an error); if the SE is
  still unlocked (a power cut between store and lock), lock it now;
* SE locked and unknown: it is bound to another host; refuse it.

Every outcome goes to a pluggable reporter ``(event kind, device id, SE id, time)``; the
default drops them, :class:`trustfleet.binding.reporting.HttpReporter` posts them to the
server's fleet view. A reporter that raises is logged and ignored: reporting never decides
a power-up.

Store file (canonical JSON)::

    {"format": "trustfleet-se-host-v1", "nonce": b64(12), "ciphertext": b64(AES-256-GCM(
        HKDF-SHA256(host key, info "TF-SEB-v1 host store key"), nonce, payload, aad=format))}
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustfleet.binding.errors import (
    SeBlocked,
    SeBoundElsewhere,
    SeError,
    SeHostStoreExists,
    SeHostStoreUnreadable,
    SeNotBound,
    SeVerificationFailed,
)
from trustfleet.binding.protocol import (
    DO_HOLDER_DATA,
    DO_SERVICE_PUBLIC_KEY,
    Credential,
    HostAdminReset,
    HostRegistration,
    HostVerification,
    Lifecycle,
    Mode,
    Random,
    SecureChannel,
    SeStatus,
    Verified,
    get_data_command,
    lock_command,
    raise_for_status,
    select_command,
    sign_command,
)
from trustfleet.binding.transport import Transport
from trustfleet.store.files import atomic_write, read_small_file, remove_stale_temporaries
from trustfleet.wire.apdu import CommandApdu, ResponseApdu

HOST_KEY_SIZE = 32
STORE_FORMAT = "trustfleet-se-host-v1"
_STORE_KEY_INFO = b"TF-SEB-v1 host store key"
_NONCE_SIZE = 12
_MAX_STORE_SIZE = 1024 * 1024

log = logging.getLogger("trustfleet.binding")


# =====================================================================================
# Events
# =====================================================================================


class EventKind(StrEnum):
    BOUND = "bound"
    LOCKED = "locked"
    VERIFIED = "verified"
    FAILED = "failed"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class BindingEvent:
    kind: EventKind
    device_id: str
    se_id: bytes
    time: datetime


Reporter = Callable[[BindingEvent], None]


def no_report(event: BindingEvent) -> None:
    """The default reporter: events go nowhere."""


# =====================================================================================
# The host key and the credential store
# =====================================================================================


class HostKey:
    """The 32-byte secret the store is encrypted under (a file readable by its owner)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != HOST_KEY_SIZE:
            raise SeHostStoreUnreadable(f"a host key is exactly {HOST_KEY_SIZE} bytes")
        self._secret = secret

    @classmethod
    def generate_file(cls, path: str | os.PathLike[str]) -> HostKey:
        """Create a new random key file (mode 0600); refuses to overwrite one."""
        secret = secrets.token_bytes(HOST_KEY_SIZE)
        try:
            atomic_write(Path(path), secret, exclusive=True)
        except FileExistsError:
            raise SeHostStoreExists("the host key file already exists") from None
        return cls(secret)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HostKey:
        try:
            return cls(read_small_file(Path(path), HOST_KEY_SIZE))
        except (OSError, ValueError):
            raise SeHostStoreUnreadable("the host key file cannot be read") from None

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> HostKey:
        return cls.from_file(path) if Path(path).exists() else cls.generate_file(path)

    def _aead(self) -> AESGCM:
        return AESGCM(HKDF(hashes.SHA256(), 32, None, _STORE_KEY_INFO).derive(self._secret))

    def __repr__(self) -> str:
        return "<HostKey (secret)>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a HostKey cannot be pickled")


class HostStore:
    """The host's credentials, one per SE ID, in one encrypted file."""

    def __init__(self, path: str | os.PathLike[str], key: HostKey) -> None:
        self.path = Path(path)
        self._key = key
        self._credentials = self._read() if self.path.exists() else {}

    def credential(self, se_id: bytes) -> Credential | None:
        return self._credentials.get(se_id)

    def se_ids(self) -> list[bytes]:
        return sorted(self._credentials)

    def put(self, credential: Credential) -> None:
        self._write({**self._credentials, credential.se_id: credential})

    def forget(self, se_id: bytes) -> None:
        if se_id in self._credentials:
            self._write({k: v for k, v in self._credentials.items() if k != se_id})

    def _write(self, credentials: dict[bytes, Credential]) -> None:
        payload = json.dumps(
            {"credentials": [_credential_to_json(c) for c in credentials.values()]},
            sort_keys=True,
        ).encode()
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = self._key._aead().encrypt(nonce, payload, STORE_FORMAT.encode())
        envelope = {"format": STORE_FORMAT, "nonce": _b64(nonce), "ciphertext": _b64(sealed)}
        atomic_write(self.path, json.dumps(envelope, sort_keys=True).encode())
        self._credentials = credentials

    def _read(self) -> dict[bytes, Credential]:
        remove_stale_temporaries(self.path)
        try:
            envelope = json.loads(read_small_file(self.path, _MAX_STORE_SIZE))
            if envelope["format"] != STORE_FORMAT:
                raise ValueError("not a host binding store")
            nonce, sealed = _unb64(envelope["nonce"]), _unb64(envelope["ciphertext"])
            payload = self._key._aead().decrypt(nonce, sealed, STORE_FORMAT.encode())
            entries = json.loads(payload)["credentials"]
            creds = [_credential_from_json(entry) for entry in entries]
        except InvalidTag:
            raise SeHostStoreUnreadable("wrong host key, or the store was altered") from None
        except (OSError, KeyError, TypeError, ValueError, SeError):
            raise SeHostStoreUnreadable() from None
        return {c.se_id: c for c in creds}


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(value, validate=True)


def _credential_to_json(c: Credential) -> dict[str, Any]:
    return {
        "se_id": c.se_id.hex(),
        "device_id": c.device_id,
        "mode": c.mode.value,
        "suite": c.suite,
        "secret": _b64(c.secret),
    }


def _credential_from_json(obj: dict[str, Any]) -> Credential:
    return Credential(
        se_id=bytes.fromhex(obj["se_id"]),
        device_id=str(obj["device_id"]),
        mode=Mode(obj["mode"]),
        suite=str(obj["suite"]),
        secret=_unb64(obj["secret"]),
    )


# =====================================================================================
# The host
# =====================================================================================


@dataclass(frozen=True, slots=True)
class PowerUpResult:
    se_id: bytes
    mode: Mode
    suite: str
    bound_now: bool
    #: APDU exchanges this power-up took (SELECT included)
    apdus: int


class Host:
    """A host device bound to (at most) one SE at a time through ``transport``."""

    def __init__(
        self,
        transport: Transport,
        store: HostStore,
        *,
        device_id: str,
        mode: Mode = Mode.MUTUAL,
        suite: str = "p256",
        r1_from_host: bool = False,
        bind_if_needed: bool = True,
        reporter: Reporter = no_report,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        random: Random = os.urandom,
    ) -> None:
        self.transport = transport
        self.store = store
        self.device_id = device_id
        self.mode = mode
        self.suite = suite
        self.r1_from_host = r1_from_host
        self.bind_if_needed = bind_if_needed
        self._reporter = reporter
        self._clock = clock
        self._random = random
        self._channel: SecureChannel | None = None
        self._se_id: bytes | None = None
        self.apdu_count = 0

    # -- power-up ----------------------------------------------------------------------

    def power_up(self) -> PowerUpResult:
        """Power the SE, then bind (first time) or verify (every time). Raises on refusal."""
        self.transport.power_cycle()
        self._channel = None
        start = self.apdu_count
        status = self.select()
        credential = self.store.credential(status.se_id)
        if credential is not None and (credential.mode, credential.suite) != (
            status.mode,
            status.suite,
        ):
            credential = None  # the SE was reset and bound again since: ours is stale
        bound_now = False
        if status.lifecycle is Lifecycle.BLANK or (
            credential is None and status.lifecycle is Lifecycle.REGISTERED
        ):
            credential, bound_now = self._bind(status), True
        elif credential is None:
            self._report(EventKind.FAILED, status.se_id)
            raise SeBoundElsewhere()
        else:
            credential, bound_now = self._verify_or_rebind(status, credential)
        return PowerUpResult(
            status.se_id, credential.mode, credential.suite, bound_now, self.apdu_count - start
        )

    def _verify_or_rebind(
        self, status: SeStatus, credential: Credential
    ) -> tuple[Credential, bool]:
        try:
            self.verify(credential)
        except SeVerificationFailed:
            if status.lifecycle is not Lifecycle.REGISTERED:
                raise
            # Unlocked and our credential is stale (a power cut after the SE registered a
            # new one but before we stored it): re-binding is allowed before lock.
            return self._bind(status), True
        if status.lifecycle is Lifecycle.REGISTERED:
            self.lock()
        return credential, False

    def _bind(self, status: SeStatus) -> Credential:
        if not self.bind_if_needed:
            raise SeNotBound(f"SE {status.se_id.hex()} is {status.lifecycle.name.lower()} here")
        registration = HostRegistration(
            se_id=status.se_id,
            device_id=self.device_id,
            mode=self.mode,
            suite=self.suite,
            r1_from_host=self.r1_from_host,
            random=self._random,
        )
        credential = self._run(registration)
        assert isinstance(credential, Credential)
        self.store.put(credential)  # stored before the lock, as the spec orders
        self._report(EventKind.BOUND, status.se_id)
        self.verify(credential)
        self.lock()
        return credential

    # -- the steps ---------------------------------------------------------------------

    def select(self) -> SeStatus:
        resp = self._exchange(select_command())
        raise_for_status(resp, "select")
        status = SeStatus.parse_fci(resp.data)
        self._se_id = status.se_id
        return status

    def verify(self, credential: Credential) -> None:
        """One verification; on success the SE's services are open until power-off."""
        self._channel = None
        try:
            outcome = self._run(HostVerification(credential, random=self._random))
        except SeVerificationFailed as failed:
            self._report(EventKind.FAILED, credential.se_id)
            if failed.tries_left == 0:
                self._report(EventKind.BLOCKED, credential.se_id)
            raise
        except SeBlocked:
            self._report(EventKind.BLOCKED, credential.se_id)
            raise
        except SeError:
            self._report(EventKind.FAILED, credential.se_id)
            raise
        assert isinstance(outcome, Verified)
        self._channel = outcome.channel
        self._report(EventKind.VERIFIED, credential.se_id)

    def lock(self) -> None:
        resp = self._service(lock_command())
        raise_for_status(resp, "bind lock")
        if self._se_id is not None:
            self._report(EventKind.LOCKED, self._se_id)

    def sign(self, data: bytes) -> bytes:
        """The SE's signing service (its service key, issuer suite)."""
        resp = self._service(sign_command(data))
        raise_for_status(resp, "sign")
        return resp.data

    def holder_data(self) -> bytes:
        """The protected data object the issuer personalised (GET DATA D1)."""
        resp = self._service(get_data_command(DO_HOLDER_DATA))
        raise_for_status(resp, "get data")
        return resp.data

    def service_public_key(self) -> bytes:
        resp = self._exchange(get_data_command(DO_SERVICE_PUBLIC_KEY))
        raise_for_status(resp, "get data")
        return resp.data

    def admin_reset(self, *, issuer_key: bytes, issuer_suite: str) -> None:
        """The issuer's authorised reset; the SE becomes blank and can be bound again."""
        status = self.select()
        self._run(
            HostAdminReset(se_id=status.se_id, issuer_suite=issuer_suite, issuer_key=issuer_key)
        )
        self.store.forget(status.se_id)

    # -- plumbing ----------------------------------------------------------------------

    def _service(self, cmd: CommandApdu) -> ResponseApdu:
        channel = self._channel
        if channel is None:
            return self._exchange(cmd)
        return channel.unwrap_response(self._exchange(channel.wrap_command(cmd)))

    def _run(self, flow: HostRegistration | HostVerification | HostAdminReset) -> object:
        step: object = flow.start()
        while isinstance(step, CommandApdu):
            step = flow.receive(self._exchange(step))
        return step

    def _exchange(self, cmd: CommandApdu) -> ResponseApdu:
        self.apdu_count += 1
        return ResponseApdu.parse(self.transport.transmit(cmd.encode()))

    def _report(self, kind: EventKind, se_id: bytes) -> None:
        if self._reporter is no_report:
            return
        try:
            self._reporter(BindingEvent(kind, self.device_id, se_id, self._clock()))
        except Exception:  # the SE decides the power-up, not the reporter
            log.exception("the binding event reporter failed; event %s not reported", kind.value)
