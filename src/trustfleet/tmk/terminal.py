"""The reference POS terminal: what ``trustfleet emulate pos`` runs.

A terminal lives in one directory::

    device.key          the device key the SCM file is encrypted under (0600)
    scm.json            the secure control module: TKP_Pr and, once downloaded, the TMK
    ksrcrt.pem          the key server's root certificate, preloaded at the factory
    record.ndjson       the factory record (SN, model, TKP_Pu) for the manufacturer's import
    working-keys.json   the working keys received, as the TR-31 blocks they came in

Working keys stay in their TR-31 key blocks, i.e. encrypted and authenticated under the
TMK, which only the SCM holds: that is the protected storage the key hierarchy is for. Each
use unwraps the block inside :class:`PosSecureModule` with ``tr31.unwrap_for``, which
enforces the block's key usage and mode of use against what the terminal is about to do; the
clear key exists only for that call and is never returned. The download runs
:class:`~trustfleet.tmk.protocol.TerminalSession` over HTTP (:class:`HttpTransport`), in
protocol version 2 (the key server signs the delivery) unless told to speak version 1; it
never falls back to version 1 on its own.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography import x509

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.crypto.payment import pinblock, tr31
from trustfleet.errors import InvalidInput
from trustfleet.store.files import atomic_write
from trustfleet.tmk.errors import ScmError, TmkError, TmkServerRefused, TmkWorkingKeyRefused
from trustfleet.tmk.protocol import (
    PROTOCOL_VERSION,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalSession,
)
from trustfleet.tmk.scm import DEFAULT_MODEL, DeviceKey, SecureControlModule, TerminalRecord
from trustfleet.wire import utcnow

DEVICE_KEY_FILE = "device.key"
SCM_FILE = "scm.json"
ROOT_FILE = "ksrcrt.pem"
RECORD_FILE = "record.ndjson"
WORKING_KEYS_FILE = "working-keys.json"
KSRCRT_CRL_PATH = "/v1/ca/tmk-ksrcrt/crl"
IDENTITY_PATH = "/v1/tmk/identity"

#: what this terminal does with each working-key usage, hence the modes it accepts: it
#: only encrypts PINs (E), generates and verifies MACs (C or G), and en/decrypts data
TERMINAL_MODES: dict[str, frozenset[str]] = {
    "P0": frozenset({"E"}),
    "M1": frozenset({"C", "G"}),
    "M3": frozenset({"C", "G"}),
    "D0": frozenset({"B", "D", "E"}),
}


# =====================================================================================
# The secure module, with working-key use
# =====================================================================================


@dataclass(frozen=True)
class ReceivedWorkingKey:
    """Public facts about a working key the terminal accepted."""

    usage: str
    algorithm: KeyAlgorithm
    mode_of_use: str
    key_version: str
    kcv: bytes


def _block_algorithm(header: tr31.KeyBlockHeader, key: bytes) -> KeyAlgorithm:
    if header.algorithm == "T":
        return KeyAlgorithm.TDES
    if header.algorithm == "A" and len(key) in (16, 32):
        return KeyAlgorithm.AES_128 if len(key) == 16 else KeyAlgorithm.AES_256
    raise TmkWorkingKeyRefused(f"a working key of algorithm {header.algorithm!r} is not supported")


class PosSecureModule(SecureControlModule):
    """The SCM plus the uses of working keys received under the TMK. Like the TMK, a
    working key is only ever used inside a method here; no method returns one."""

    __slots__ = ()

    def _unwrap_working_key(
        self, block: str, usage: str
    ) -> tuple[tr31.KeyBlockHeader, KeyAlgorithm, bytes]:
        if usage not in TERMINAL_MODES:
            raise TmkWorkingKeyRefused(f"this terminal has no use for key usage {usage[:4]!r}")
        tmk = self._installed()
        header, key = tr31.unwrap_for(
            tmk.key, block, expected_usage=usage, expected_modes=TERMINAL_MODES[usage]
        )
        algorithm = _block_algorithm(header, key)
        blocks = dict(header.optional_blocks)
        if "KP" in blocks and not hmac.compare_digest(blocks["KP"][2:], tmk.kcv.hex().upper()):
            raise TmkWorkingKeyRefused("the block names another TMK as its protection key")
        kcv = kcvs.kcv(algorithm, key)
        if "KC" in blocks and not hmac.compare_digest(blocks["KC"][2:], kcv.hex().upper()):
            raise TmkWorkingKeyRefused("the key does not match the check value in its block")
        return header, algorithm, key

    def check_working_key(self, block: str, usage: str) -> ReceivedWorkingKey:
        """Authenticate ``block`` under the TMK and enforce that it is a ``usage`` key with
        a mode of use this terminal allows; return its public facts."""
        header, algorithm, key = self._unwrap_working_key(block, usage)
        return ReceivedWorkingKey(
            usage=header.key_usage,
            algorithm=algorithm,
            mode_of_use=header.mode_of_use,
            key_version=header.key_version,
            kcv=kcvs.kcv(algorithm, key),
        )

    def encrypt_pin_block(
        self,
        block: str,
        *,
        pin: str,
        pan: str,
        random: Callable[[int], bytes] = os.urandom,
    ) -> bytes:
        """The PIN block of ``pin`` for ``pan`` under the P0 key in ``block``: ISO 9564-1
        format 4 for AES keys, format 0 for TDES keys."""
        _, algorithm, key = self._unwrap_working_key(block, "P0")
        encrypt, _ = pinblock.ecb_cipher(algorithm, key)
        pin_format = pinblock.FORMAT_FOR_ALGORITHM[algorithm]
        return pinblock.encipher(pin_format, encrypt, pin, pan, random=random)


# =====================================================================================
# Transport
# =====================================================================================


class Transport(Protocol):
    """How the terminal reaches the key server (through its device gateway)."""

    def post(self, path: str, body: bytes) -> bytes: ...

    def get(self, path: str) -> bytes: ...


class HttpTransport:
    """JSON over HTTP with the device gateway's bearer token (none for public reads).
    ``client`` may be any ``httpx.Client`` (FastAPI's TestClient is one)."""

    def __init__(self, client: httpx.Client, token: str) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, path: str, body: bytes) -> bytes:
        headers = {**self._headers, "Content-Type": "application/json"}
        return self._checked(self._client.post(path, content=body, headers=headers))

    def get(self, path: str) -> bytes:
        return self._checked(self._client.get(path, headers=self._headers))

    @staticmethod
    def _checked(response: httpx.Response) -> bytes:
        if response.status_code < 400:
            return response.content
        try:
            problem = response.json()
            code, detail = str(problem["code"]), str(problem.get("detail", ""))
        except (ValueError, KeyError, TypeError):
            code, detail = f"http-{response.status_code}", response.text[:200]
        raise TmkServerRefused(code[:64], detail[:300], response.status_code)


# =====================================================================================
# The terminal
# =====================================================================================


@dataclass(frozen=True)
class DownloadResult:
    session_id: str
    algorithm: KeyAlgorithm
    kcv: bytes
    activated_at: str


class PosTerminal:
    """A reference POS terminal in a directory (see the module docstring)."""

    def __init__(self, directory: Path, scm: PosSecureModule) -> None:
        self.directory = directory
        self.scm = scm

    # -- factory ------------------------------------------------------------------------

    @classmethod
    def factory(
        cls,
        directory: str | os.PathLike[str],
        sn: str,
        algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
        *,
        model: str = DEFAULT_MODEL,
        root_pem: bytes | None = None,
    ) -> TerminalRecord:
        """Make a terminal: device key, SCM with a fresh TKP, the factory record for the
        key server's import, and (if given) the preloaded KSRCRT."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        device_key = DeviceKey.generate_file(path / DEVICE_KEY_FILE)
        record = PosSecureModule.factory(
            path / SCM_FILE, sn, algorithm, device_key=device_key, model=model
        )
        row = {k: v for k, v in record.to_dict().items() if v is not None}
        atomic_write(path / RECORD_FILE, (json.dumps(row) + "\n").encode())
        terminal = cls.open(path)
        if root_pem is not None:
            terminal.install_root(root_pem)
        return record

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> PosTerminal:
        path = Path(directory)
        device_key = DeviceKey.from_file(path / DEVICE_KEY_FILE)
        scm = PosSecureModule.open(path / SCM_FILE, device_key)
        assert isinstance(scm, PosSecureModule)
        return cls(path, scm)

    def install_root(self, pem: bytes) -> x509.Certificate:
        """Preload KSRCRT (a factory step: the terminal trusts whatever root it holds)."""
        try:
            root = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise InvalidInput("the key server root is not a PEM certificate") from None
        atomic_write(self.directory / ROOT_FILE, pem)
        return root

    @property
    def sn(self) -> str:
        return self.scm.sn

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        path = self.directory / ROOT_FILE
        if not path.is_file():
            return ()
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))

    # -- download -----------------------------------------------------------------------

    def download(
        self,
        transport: Transport,
        *,
        crls: Sequence[x509.CertificateRevocationList] = (),
        clock: Callable[[], datetime] = utcnow,
        version: int = PROTOCOL_VERSION,
    ) -> DownloadResult:
        """Run the TMK download against the key server, in protocol ``version``. A failure
        on the terminal's side is reported to the server (which then ends the session at
        once) and re-raised; nothing is tried again in another version (a refusal can be
        forged by anyone on the path, so falling back would be a downgrade)."""
        trust = ServerTrust(self.roots, tuple(crls))
        session = TerminalSession(self.scm, trust, clock=clock, version=version)
        request = session.start()
        challenge = ServerChallenge.from_json(
            transport.post("/v1/tmk/downloads", request.to_json())
        )
        base = f"/v1/tmk/downloads/{challenge.session_id}"
        try:
            proof = session.receive_challenge(challenge)
            delivery = KeyDelivery.from_json(transport.post(f"{base}/proof", proof.to_json()))
            confirmation = session.receive_delivery(delivery)
        except TmkServerRefused:
            raise
        except TmkError as exc:
            self._report_failure(transport, base, exc.code, session.ticket)
            raise
        answer = json.loads(transport.post(f"{base}/confirm", confirmation.to_json()))
        self._save_working_keys({})  # blocks under the previous TMK are void now
        return DownloadResult(
            session_id=challenge.session_id,
            algorithm=delivery.algorithm,
            kcv=delivery.kcv,
            activated_at=str(answer.get("activated_at", "")),
        )

    @staticmethod
    def _report_failure(transport: Transport, base: str, code: str, ticket: bytes | None) -> None:
        # best effort: the server's session expires anyway. Before the proof the server
        # knows the session only from its ticket.
        report = {"code": code}
        if ticket is not None:
            report["ticket"] = base64.b64encode(ticket).decode()
        with contextlib.suppress(TmkServerRefused, httpx.HTTPError):
            transport.post(f"{base}/abort", json.dumps(report).encode())

    @staticmethod
    def fetch_crl(transport: Transport) -> x509.CertificateRevocationList:
        """KSRCRT's CRL from the key server (public; its signature is checked on use)."""
        try:
            return x509.load_der_x509_crl(transport.get(KSRCRT_CRL_PATH))
        except ValueError:
            raise InvalidInput("the key server's CRL is not valid DER") from None

    # -- working keys -------------------------------------------------------------------

    def install_working_key(self, block: str, usage: str) -> ReceivedWorkingKey:
        """Accept a TR-31 block from the TMS: it must authenticate under the TMK and be a
        ``usage`` key with a mode this terminal allows; it replaces the previous one."""
        received = self.scm.check_working_key(block, usage)
        keys = self._load_working_keys()
        keys[usage] = block
        self._save_working_keys(keys)
        return received

    def working_keys(self) -> dict[str, ReceivedWorkingKey]:
        return {
            usage: self.scm.check_working_key(block, usage)
            for usage, block in self._load_working_keys().items()
        }

    def encrypt_pin(self, pin: str, pan: str) -> bytes:
        """A PIN block under the terminal's P0 key."""
        block = self._load_working_keys().get("P0")
        if block is None:
            raise TmkWorkingKeyRefused("no PIN key (P0) has been installed")
        return self.scm.encrypt_pin_block(block, pin=pin, pan=pan)

    def _load_working_keys(self) -> dict[str, str]:
        path = self.directory / WORKING_KEYS_FILE
        if not path.is_file():
            return {}
        try:
            loaded: Any = json.loads(path.read_bytes())
        except ValueError:
            raise ScmError("the working-key file is corrupt") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
        ):
            raise ScmError("the working-key file is corrupt")
        return loaded

    def _save_working_keys(self, keys: dict[str, str]) -> None:
        atomic_write(self.directory / WORKING_KEYS_FILE, json.dumps(keys, indent=1).encode())
