"""The terminal's secure control module (SCM): a software reference of the tamper-resistant
module that holds the terminal authentication key pair (TKP) and the TMK.

The SCM keeps its keys in one file, encrypted with AES-256-GCM under a *device key* (a
32-byte key file, or a passphrase stretched with scrypt); every write uses a fresh nonce
and replaces the file atomically. It offers *uses* of the keys and nothing that returns
them: no method and no attribute access meant for callers yields TKP_Pr or the TMK. As
the spec asks (its §[0067]: "no TKP_Pr encrypt/decrypt function, only a remote key
download function"), TKP_Pr signs only TMK-download proofs and decrypts only TMK
deliveries, so the SCM is no general signing or decryption oracle.

File layout (canonical JSON)::

    {"format": "trustfleet-scm-v1",
     "kdf": {"name": "key-file"} | {"name": "scrypt", "salt": b64, "n": .., "r": .., "p": ..},
     "nonce": b64(12 bytes),
     "ciphertext": b64(AES-256-GCM(file key, nonce, payload, aad = format + kdf))}

The payload is canonical JSON with the SN, model, key algorithms, private keys (PKCS#8
DER, raw scalar for SM2) and the TMK (algorithm, key, KCV). The file key is
HKDF-SHA256(key file, "TF-SCM-v1 file key") or scrypt(passphrase, salt).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trustfleet.crypto import (
    algorithm_of,
    generate_private_key,
    load_private_key,
    private_key_to_der,
    public_key_to_pem,
    suite_for_algorithm,
)
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey, Suite
from trustfleet.crypto.payment import kcv as kcv_module
from trustfleet.errors import CryptoError, TrustfleetError
from trustfleet.store.files import atomic_write
from trustfleet.tmk.errors import (
    ScmError,
    ScmExists,
    ScmNoTmk,
    ScmUnreadable,
    TmkKcvMismatch,
    TmkUnsupportedSuite,
    TmkUnwrapFailed,
)
from trustfleet.tmk.protocol import (
    PROTOCOL_V1,
    TMK_ALGORITHMS,
    confirmation_data,
    suite_for_terminal_key,
    terminal_auth_tbs,
    transport_info,
    validate_sn,
)
from trustfleet.wire import canonical_json

FORMAT = "trustfleet-scm-v1"
DEVICE_KEY_SIZE = 32
DEFAULT_MODEL = "trustfleet-reference-terminal"
#: TKP algorithms a terminal can be made with; Ed25519 terminals get an X25519 KEM key too
TKP_ALGORITHMS = frozenset(
    {
        KeyAlgorithm.EC_P256,
        KeyAlgorithm.RSA_2048,
        KeyAlgorithm.RSA_3072,
        KeyAlgorithm.SM2,
        KeyAlgorithm.ED25519,
    }
)
_TMK_KEY_LENGTHS = {
    KeyAlgorithm.AES_128: (16,),
    KeyAlgorithm.AES_256: (32,),
    KeyAlgorithm.TDES: (16, 24),
}
_FILE_KEY_INFO = b"TF-SCM-v1 file key"
_NONCE_SIZE = 12
_MAX_FILE_SIZE = 1024 * 1024
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1


# =====================================================================================
# Device key: what the file is encrypted under
# =====================================================================================


class DeviceKey:
    """The secret the SCM file is encrypted under: a 32-byte key file or a passphrase.

    A real terminal would keep this in its tamper-responsive hardware; the reference
    terminal keeps it in a file readable only by its owner, or asks for a passphrase.
    """

    __slots__ = ("_kind", "_n", "_secret")

    def __init__(self, kind: Literal["key-file", "scrypt"], secret: bytes, n: int) -> None:
        self._kind = kind
        self._secret = secret
        self._n = n

    @classmethod
    def generate_file(cls, path: str | os.PathLike[str]) -> DeviceKey:
        """Create a new random key file (mode 0600; refuses to overwrite) and use it."""
        secret = secrets.token_bytes(DEVICE_KEY_SIZE)
        try:
            atomic_write(Path(path), secret, exclusive=True)
        except FileExistsError:
            raise ScmExists("the device key file already exists") from None
        return cls("key-file", secret, 0)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DeviceKey:
        try:
            secret = Path(path).read_bytes()
        except OSError:
            raise ScmUnreadable("the device key file cannot be read") from None
        if len(secret) != DEVICE_KEY_SIZE:
            raise ScmUnreadable(f"a device key file holds exactly {DEVICE_KEY_SIZE} bytes")
        return cls("key-file", secret, 0)

    @classmethod
    def from_passphrase(cls, passphrase: str, *, scrypt_n: int = _SCRYPT_N) -> DeviceKey:
        """A passphrase; ``scrypt_n`` applies to files this key *creates* (reading uses
        the cost stored in the file)."""
        if not passphrase:
            raise ScmError("the passphrase must not be empty")
        return cls("scrypt", passphrase.encode("utf-8"), scrypt_n)

    @property
    def kind(self) -> str:
        return self._kind

    def _new_kdf(self) -> dict[str, Any]:
        if self._kind == "key-file":
            return {"name": "key-file"}
        salt = _b64(secrets.token_bytes(16))
        return {"name": "scrypt", "salt": salt, "n": self._n, "r": _SCRYPT_R, "p": _SCRYPT_P}

    def _file_key(self, kdf: dict[str, Any]) -> bytes:
        if kdf.get("name") != self._kind:
            raise ScmUnreadable("the file is protected by another kind of device key")
        if self._kind == "key-file":
            return HKDF(hashes.SHA256(), 32, None, _FILE_KEY_INFO).derive(self._secret)
        try:
            salt = _unb64(kdf["salt"])
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            if not (2**10 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16 and len(salt) >= 16):
                raise ValueError("scrypt parameters out of range")
            return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(self._secret)
        except (KeyError, TypeError, ValueError):
            raise ScmUnreadable("the file's scrypt parameters are not valid") from None

    def __repr__(self) -> str:
        return f"<DeviceKey {self._kind} (secret)>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a DeviceKey cannot be pickled")


# =====================================================================================
# The factory record
# =====================================================================================


@dataclass(frozen=True, slots=True)
class TerminalRecord:
    """What the factory exports for the key server: public facts only."""

    sn: str
    model: str
    algorithm: KeyAlgorithm
    public_key_pem: str
    #: the separate key-transport key of Ed25519 terminals (X25519), else None
    kem_algorithm: KeyAlgorithm | None = None
    kem_public_key_pem: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """The row the key server's terminal import reads (``sn``, ``model``, ``public_key``)."""
        return {
            "sn": self.sn,
            "model": self.model,
            "algorithm": self.algorithm.value,
            "public_key": self.public_key_pem,
            "kem_algorithm": self.kem_algorithm.value if self.kem_algorithm else None,
            "kem_public_key": self.kem_public_key_pem,
        }


def _pem(public_key: PublicKey) -> str:
    return public_key_to_pem(public_key).decode("ascii")


# =====================================================================================
# The module
# =====================================================================================


@dataclass(frozen=True, slots=True, repr=False)
class _InstalledTmk:
    algorithm: KeyAlgorithm
    key: bytes
    kcv: bytes
    session_id: str

    def __repr__(self) -> str:
        return f"<TMK {self.algorithm.value} (secret)>"


class SecureControlModule:
    """The reference terminal's key module. Create one with :meth:`factory` (once, at the
    factory), then :meth:`open` it with the same device key on every start."""

    __slots__ = (
        "_algorithm",
        "_device_key",
        "_kdf",
        "_kem_algorithm",
        "_kem_key",
        "_model",
        "_path",
        "_sn",
        "_tkp",
        "_tmk",
    )

    def __init__(
        self,
        *,
        path: Path,
        device_key: DeviceKey,
        kdf: dict[str, Any],
        sn: str,
        model: str,
        algorithm: KeyAlgorithm,
        tkp: PrivateKey,
        kem_algorithm: KeyAlgorithm | None,
        kem_key: PrivateKey | None,
        tmk: _InstalledTmk | None,
    ) -> None:
        """Internal: use :meth:`factory` or :meth:`open`."""
        self._path = path
        self._device_key = device_key
        self._kdf = kdf
        self._sn = sn
        self._model = model
        self._algorithm = algorithm
        self._tkp = tkp
        self._kem_algorithm = kem_algorithm
        self._kem_key = kem_key
        self._tmk = tmk

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def factory(
        cls,
        path: str | os.PathLike[str],
        sn: str,
        algorithm: KeyAlgorithm,
        *,
        device_key: DeviceKey,
        model: str = DEFAULT_MODEL,
    ) -> TerminalRecord:
        """Generate the TKP inside a new SCM file at ``path`` and return the record the
        manufacturer imports into the key server. Refuses to overwrite an existing SCM."""
        validate_sn(sn)
        if algorithm not in TKP_ALGORITHMS:
            raise TmkUnsupportedSuite(f"a terminal key cannot be {algorithm}")
        if Path(path).exists():
            raise ScmExists()
        tkp = generate_private_key(algorithm)
        kem_algorithm = KeyAlgorithm.X25519 if algorithm is KeyAlgorithm.ED25519 else None
        kem_key = generate_private_key(kem_algorithm) if kem_algorithm else None
        scm = cls(
            path=Path(path),
            device_key=device_key,
            kdf=device_key._new_kdf(),
            sn=sn,
            model=model,
            algorithm=algorithm,
            tkp=tkp,
            kem_algorithm=kem_algorithm,
            kem_key=kem_key,
            tmk=None,
        )
        scm._save()
        return scm.record()

    @classmethod
    def open(cls, path: str | os.PathLike[str], device_key: DeviceKey) -> SecureControlModule:
        """Load and decrypt the SCM file; ScmUnreadable if it is corrupt or the key wrong."""
        envelope = _read_envelope(Path(path))
        kdf = envelope["kdf"]
        file_key = device_key._file_key(kdf)
        aad = canonical_json({"format": FORMAT, "kdf": kdf})
        try:
            plain = AESGCM(file_key).decrypt(envelope["nonce"], envelope["ciphertext"], aad)
        except InvalidTag:
            raise ScmUnreadable() from None
        return cls._from_payload(Path(path), device_key, kdf, plain)

    # -- public facts ------------------------------------------------------------------

    @property
    def sn(self) -> str:
        return self._sn

    @property
    def model(self) -> str:
        return self._model

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    @property
    def suite(self) -> str:
        return self._suite().name

    @property
    def public_key(self) -> PublicKey:
        return self._tkp.public_key()

    @property
    def kem_public_key(self) -> PublicKey:
        """The key the TMK is transported to: TKP_Pu, or the X25519 key of Ed25519 SCMs."""
        return (self._kem_key or self._tkp).public_key()

    @property
    def has_tmk(self) -> bool:
        return self._tmk is not None

    @property
    def tmk_algorithm(self) -> KeyAlgorithm:
        return self._installed().algorithm

    @property
    def tmk_kcv(self) -> bytes:
        """The installed TMK's key check value (public: it identifies, not reveals)."""
        return self._installed().kcv

    def record(self) -> TerminalRecord:
        kem = self._kem_key.public_key() if self._kem_key else None
        return TerminalRecord(
            sn=self._sn,
            model=self._model,
            algorithm=self._algorithm,
            public_key_pem=_pem(self.public_key),
            kem_algorithm=self._kem_algorithm,
            kem_public_key_pem=_pem(kem) if kem is not None else None,
        )

    # -- the TMK download operations (TerminalKeyModule) -------------------------------

    def sign_terminal_proof(
        self, *, session_id: str, rnd1: bytes, rnd2: bytes, version: int = PROTOCOL_V1
    ) -> bytes:
        """TKP_Pr's signature over TBS2 of a TMK download, and over nothing else."""
        tbs = terminal_auth_tbs(
            sn=self._sn,
            suite=self.suite,
            session_id=session_id,
            rnd1=rnd1,
            rnd2=rnd2,
            version=version,
        )
        return self._suite().sign(self._tkp, tbs)

    def install_tmk(
        self,
        *,
        session_id: str,
        rnd1: bytes,
        rnd2: bytes,
        algorithm: KeyAlgorithm,
        wrapped_tmk: bytes,
        kcv: bytes,
        version: int = PROTOCOL_V1,
    ) -> None:
        """Unwrap a delivered TMK, check its KCV and store it, replacing any earlier one.

        Nothing is stored unless every check passes. (In protocol version 2 the terminal
        role has checked the key server's signature over the delivery before this.)
        """
        if algorithm not in TMK_ALGORITHMS:
            raise TmkUnsupportedSuite(f"a TMK cannot be {algorithm}")
        suite = self._suite()
        info = transport_info(
            suite,
            sn=self._sn,
            session_id=session_id,
            rnd1=rnd1,
            rnd2=rnd2,
            algorithm=algorithm,
            version=version,
        )
        kem_key = self._kem_key or self._tkp
        try:
            key = suite_for_algorithm(self._kem_or_tkp_algorithm()).kem_unwrap(
                kem_key, wrapped_tmk, info
            )
        except CryptoError:
            raise TmkUnwrapFailed() from None
        if len(key) not in _TMK_KEY_LENGTHS[algorithm]:
            raise TmkUnwrapFailed("the delivered key has the wrong length for its algorithm")
        if not hmac.compare_digest(kcv_module.kcv(algorithm, key), kcv):
            raise TmkKcvMismatch()
        previous = self._tmk
        self._tmk = _InstalledTmk(algorithm=algorithm, key=key, kcv=kcv, session_id=session_id)
        try:
            self._save()
        except BaseException:
            self._tmk = previous
            raise

    def confirmation_mac(self, *, session_id: str, kcv: bytes, version: int = PROTOCOL_V1) -> bytes:
        """CMAC under the TMK installed by ``session_id`` over the confirmation data."""
        tmk = self._installed()
        if tmk.session_id != session_id or not hmac.compare_digest(tmk.kcv, kcv):
            raise ScmNoTmk("the installed TMK is not the one this session delivered")
        data = confirmation_data(session_id=session_id, kcv=kcv, version=version)
        return self.tmk_cmac(data)

    # -- general use of the TMK --------------------------------------------------------

    def tmk_cmac(self, data: bytes) -> bytes:
        """CMAC under the TMK: AES-CMAC (16 bytes) or TDES-CMAC (8 bytes)."""
        tmk = self._installed()
        cipher: algorithms.AES | TripleDES
        if tmk.algorithm is KeyAlgorithm.TDES:
            cipher = TripleDES(kcv_module.tdes_cipher_key(tmk.key))
        else:
            cipher = algorithms.AES(tmk.key)
        mac = cmac.CMAC(cipher)
        mac.update(data)
        return mac.finalize()

    def tmk_cmac_verify(self, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.tmk_cmac(data), tag)

    # -- internals ---------------------------------------------------------------------

    def _suite(self) -> Suite:
        return suite_for_terminal_key(self._tkp.public_key())

    def _kem_or_tkp_algorithm(self) -> KeyAlgorithm:
        return self._kem_algorithm or self._algorithm

    def _installed(self) -> _InstalledTmk:
        if self._tmk is None:
            raise ScmNoTmk()
        return self._tmk

    def _payload(self) -> bytes:
        tmk = self._tmk
        return canonical_json(
            {
                "sn": self._sn,
                "model": self._model,
                "algorithm": self._algorithm.value,
                "tkp": _b64(private_key_to_der(self._tkp)),
                "kem_algorithm": self._kem_algorithm.value if self._kem_algorithm else None,
                "kem": _b64(private_key_to_der(self._kem_key)) if self._kem_key else None,
                "tmk": None
                if tmk is None
                else {
                    "algorithm": tmk.algorithm.value,
                    "key": _b64(tmk.key),
                    "kcv": _b64(tmk.kcv),
                    "session_id": tmk.session_id,
                },
            }
        )

    @classmethod
    def _from_payload(
        cls, path: Path, device_key: DeviceKey, kdf: dict[str, Any], plain: bytes
    ) -> SecureControlModule:
        try:
            obj = json.loads(plain)
            algorithm = KeyAlgorithm(obj["algorithm"])
            kem_algorithm = KeyAlgorithm(obj["kem_algorithm"]) if obj["kem_algorithm"] else None
            tmk_obj = obj["tmk"]
            tmk = (
                None
                if tmk_obj is None
                else _InstalledTmk(
                    algorithm=KeyAlgorithm(tmk_obj["algorithm"]),
                    key=_unb64(tmk_obj["key"]),
                    kcv=_unb64(tmk_obj["kcv"]),
                    session_id=str(tmk_obj["session_id"]),
                )
            )
            return cls(
                path=path,
                device_key=device_key,
                kdf=kdf,
                sn=str(obj["sn"]),
                model=str(obj["model"]),
                algorithm=algorithm,
                tkp=_load_private(algorithm, _unb64(obj["tkp"])),
                kem_algorithm=kem_algorithm,
                kem_key=(
                    _load_private(kem_algorithm, _unb64(obj["kem"])) if kem_algorithm else None
                ),
                tmk=tmk,
            )
        except (KeyError, TypeError, ValueError, TrustfleetError):
            raise ScmUnreadable("the SCM payload is not valid") from None

    def _save(self) -> None:
        nonce = secrets.token_bytes(_NONCE_SIZE)  # fresh for every write
        aad = canonical_json({"format": FORMAT, "kdf": self._kdf})
        file_key = self._device_key._file_key(self._kdf)
        ciphertext = AESGCM(file_key).encrypt(nonce, self._payload(), aad)
        envelope = {
            "format": FORMAT,
            "kdf": self._kdf,
            "nonce": _b64(nonce),
            "ciphertext": _b64(ciphertext),
        }
        try:
            atomic_write(self._path, canonical_json(envelope))
        except OSError:
            raise ScmError("the secure control module file cannot be written") from None

    def __repr__(self) -> str:
        state = "with TMK" if self._tmk else "no TMK"
        return f"<SecureControlModule sn={self._sn} {self._algorithm.value} {state}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecureControlModule cannot be pickled")


# =====================================================================================
# Helpers
# =====================================================================================


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _load_private(algorithm: KeyAlgorithm, data: bytes) -> PrivateKey:
    key = load_private_key(data)
    if algorithm_of(key) is not algorithm:
        raise ValueError("the stored key is not of the recorded algorithm")
    return key


def _read_envelope(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_FILE_SIZE:
            raise ScmUnreadable("the SCM file is too large")
        obj = json.loads(path.read_bytes())
        if obj["format"] != FORMAT or not isinstance(obj["kdf"], dict):
            raise ScmUnreadable("not a trustfleet SCM file")
        nonce = _unb64(obj["nonce"])
        if len(nonce) != _NONCE_SIZE:
            raise ScmUnreadable("the SCM file's nonce is malformed")
        return {"kdf": obj["kdf"], "nonce": nonce, "ciphertext": _unb64(obj["ciphertext"])}
    except FileNotFoundError:
        raise ScmUnreadable("no SCM file at that path") from None
    except (OSError, KeyError, TypeError, ValueError):
        raise ScmUnreadable("the SCM file is corrupt") from None
