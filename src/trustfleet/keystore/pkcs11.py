"""The PKCS#11 key store: keys are token objects and every private operation runs inside
the token (SoftHSM2 in tests, an HSM in production).

Object scheme
-------------
* A key is a private-key or secret-key object with ``CKA_TOKEN=TRUE``; an asymmetric key
  also has a public-key object with the same ``CKA_ID``. The handle is ``"pkcs11:"`` +
  ``CKA_ID`` in hex. Keys made here get ``CKA_ID = b"tf" || creation time (µs, 8 bytes
  big-endian) || 6 random bytes``, which is where :attr:`KeyInfo.created_at` comes from.
* ``CKA_LABEL`` is the key's label.
* The algorithm is read from the key itself: ``CKA_KEY_TYPE`` plus ``CKA_EC_PARAMS``
  (P-256, Ed25519), the modulus size (RSA-2048/3072) or ``CKA_VALUE_LEN`` (AES-128/256);
  ``CKK_DES2``/``CKK_DES3`` are ``tdes``, ``CKK_GENERIC_SECRET``/``CKK_SHA256_HMAC`` are
  ``hmac-sha256``.
* Usage flags are token attributes, so the token enforces them as well as this class:
  SIGN=CKA_SIGN (private keys), MAC=CKA_SIGN+CKA_VERIFY (secret keys),
  DECRYPT=CKA_DECRYPT, ENCRYPT=CKA_ENCRYPT, WRAP=CKA_WRAP, UNWRAP=CKA_UNWRAP,
  DERIVE=CKA_DERIVE, WRAPPABLE=CKA_EXTRACTABLE; exportable = ``CKA_SENSITIVE=FALSE``.
  A non-exportable key is ``CKA_SENSITIVE=TRUE`` (its ``CKA_VALUE`` cannot be read), and
  only WRAPPABLE keys are ``CKA_EXTRACTABLE``. PKCS#11 reveals ``CKA_VALUE`` only of
  extractable keys, so an *exportable* key is always WRAPPABLE here (its KeyInfo says so).

Mechanisms: ECDSA P-256 (``CKM_ECDSA`` over a SHA-256 digest, DER-encoded like the soft
store), Ed25519 (``CKM_EDDSA``), RSA-PSS (``CKM_SHA256_RSA_PKCS_PSS``, MGF1-SHA256, salt
32), RSA-OAEP-SHA256 with the label as ``info`` (``CKM_RSA_PKCS_OAEP``), AES-GCM
(``CKM_AES_GCM``, same ``nonce || ciphertext || tag`` format as the soft store), AES-CMAC,
TDES-CMAC (``CKM_DES3_CMAC``), HMAC-SHA256 and RFC 5649 key wrap (``CKM_AES_KEY_WRAP_PAD``).

Not available, with UnsupportedAlgorithm and a message that says why:

* SM2, SM4, HMAC-SM3 and X25519 (no SoftHSM2 mechanisms);
* ``derive``: the documented result is HKDF-SHA256 of the ECDH secret, and SoftHSM2 has no
  HKDF mechanism (``CKM_ECDH1_DERIVE`` only takes ``CKD_NULL``); running HKDF outside the
  token would put the shared secret in host memory;
* ``decrypt``/``unwrap`` with EC keys (HPKE cannot run inside a token);
* RSA-OAEP-SHA256: SoftHSM2 2.6 accepts only OAEP with SHA-1 and an empty label, so the
  token refuses it; an HSM with OAEP-SHA256 works unchanged;
* unwrapping EC or Ed25519 private keys (the token cannot rebuild their public half).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, SignMixin, UnwrapMixin, WrapMixin

from trustfleet import crypto
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.errors import (
    ConfigurationError,
    CryptoError,
    DecryptionFailed,
    InvalidInput,
    InvalidKey,
    KeyNotExportable,
    KeyNotFound,
    KeyStoreError,
    KeyUsageNotAllowed,
    TrustfleetError,
    UnsupportedAlgorithm,
)
from trustfleet.keystore import pkcs11_objects as objects
from trustfleet.keystore import policy
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage
from trustfleet.keystore.custody import Mechanisms

_Capability = TypeVar("_Capability", SignMixin, DecryptMixin, EncryptMixin, WrapMixin, UnwrapMixin)

HANDLE_PREFIX = "pkcs11:"
ID_MARKER = b"tf"
#: CKA_ID prefix of the key store's own key encryption keys (:mod:`.pkcs11_seal`): no
#: handle reaches them
RESERVED_ID_PREFIX = b"tfkek"
#: how many keys' token objects a store remembers (token keys are few: CA and work keys)
KEY_CACHE_SIZE = 256
NONCE_SIZE = 12
TAG_BITS = 128
PSS_SALT_LENGTH = 32

UNSUPPORTED = {
    KeyAlgorithm.SM2: "SM2",
    KeyAlgorithm.SM4: "SM4",
    KeyAlgorithm.HMAC_SM3: "HMAC-SM3",
    KeyAlgorithm.X25519: "X25519",
}

#: stores of this process with an open session, per module path
_OPEN_STORES: dict[str, int] = {}
_OPEN_STORES_LOCK = threading.Lock()

_NO_DERIVE = (
    "the PKCS#11 backend cannot derive: the result is HKDF-SHA256 of the shared secret and"
    " this token has no HKDF mechanism; running HKDF outside the token would expose the"
    " secret (use the soft backend for derived keys)"
)


class _StaleHandle(KeyStoreError):
    """A remembered object handle the token no longer knows (another session or process
    destroyed the object): forget what is remembered and look again."""

    code = "keystore-error"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _fresh(
    method: Callable[Concatenate[Pkcs11KeyStore, _P], _R],
) -> Callable[Concatenate[Pkcs11KeyStore, _P], _R]:
    """Run ``method`` again, without remembered objects, if a remembered one went stale."""

    def run(self: Pkcs11KeyStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except _StaleHandle:
            self.forget()
            return method(self, *args, **kwargs)

    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


@dataclass(frozen=True, slots=True)
class _Key:
    """A key's token objects and the facts read from them."""

    handle: str
    obj: pkcs11.Key
    public: pkcs11.PublicKey | None
    algorithm: KeyAlgorithm
    usage: KeyUsage
    exportable: bool
    label: str
    created_at: datetime

    def info(self) -> KeyInfo:
        public_der = None
        if self.public is not None:
            public_der = crypto.public_key_to_der(
                objects.public_key_of(self.algorithm, self.public)
            )
        return KeyInfo(
            handle=self.handle,
            algorithm=self.algorithm,
            usage=self.usage,
            exportable=self.exportable,
            label=self.label,
            backend=Pkcs11KeyStore.backend,
            created_at=self.created_at,
            public_key_der=public_der,
        )


class Pkcs11KeyStore(KeyStore):
    """Keys inside one PKCS#11 token. One logged-in R/W session, serialised by a lock."""

    backend = "pkcs11"

    def __init__(self, module_path: str, token_label: str, user_pin: str) -> None:
        self._lock = threading.RLock()
        try:
            lib = pkcs11.lib(module_path)
        except (RuntimeError, OSError) as exc:
            raise ConfigurationError(
                f"cannot load the PKCS#11 module {module_path}: {type(exc).__name__}"
            ) from None
        with _OPEN_STORES_LOCK:
            token = _find_token(lib, module_path, token_label)
            self._session = _open_session(token, user_pin)
            _OPEN_STORES[module_path] = _OPEN_STORES.get(module_path, 0) + 1
        self._module_path = module_path
        self._closed = False
        #: what the token reported for each mechanism (C_GetMechanismInfo), read once
        self.mechanisms = Mechanisms(objects.mechanism_flags(module_path, token.slot))
        #: token objects of keys already looked up, by handle: finding objects costs the
        #: token a search (SoftHSM2: about 1 ms with a few dozen objects); an object another
        #: session destroyed makes the next call fail with a stale handle, and the key is
        #: then looked up again (see :func:`_fresh`)
        self._keys: dict[str, _Key] = {}

    @property
    def session(self) -> pkcs11.Session:
        """The store's logged-in session; hold :attr:`lock` while using it."""
        return self._session

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def forget(self) -> None:
        """Drop every remembered token object (they are looked up again when used)."""
        with self._lock:
            self._keys.clear()

    def ping(self) -> None:
        with self._lock, token_errors("token check"):
            self._session.generate_random(64)

    def close(self) -> None:
        with self._lock, _OPEN_STORES_LOCK:
            if self._closed:
                return
            self._closed = True
            _OPEN_STORES[self._module_path] -= 1
            with suppress(p11.PKCS11Error):
                self._session.close()

    # -- creating keys -----------------------------------------------------------------

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        _check_supported(algorithm, usage, label)
        key_id = _new_id()
        with self._lock, token_errors("key generation"):
            if algorithm.is_asymmetric:
                self._generate_pair(algorithm, usage, key_id, label, exportable)
            else:
                self._session.generate_key(
                    objects.KEY_TYPES.get(algorithm, KeyType.DES2),
                    algorithm.secret_length * 8 if algorithm is not KeyAlgorithm.TDES else None,
                    store=True,
                    mechanism=objects.secret_generation_mechanism(algorithm),
                    template=objects.secret_template(key_id, label, usage, exportable),
                )
            return self._find(_handle_of(key_id)).info()

    def _generate_pair(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, key_id: bytes, label: str, exp: bool
    ) -> None:
        public_template = objects.public_template(key_id, label, usage)
        bits = None
        if algorithm is KeyAlgorithm.EC_P256:
            public_template[Attribute.EC_PARAMS] = objects.P256_PARAMS
        elif algorithm is KeyAlgorithm.ED25519:
            public_template[Attribute.EC_PARAMS] = objects.ED25519_PARAMS
        else:
            bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
        self._session.generate_keypair(
            objects.KEY_TYPES[algorithm],
            bits,
            store=True,
            public_template=public_template,
            private_template=objects.private_template(key_id, label, usage, exp),
        )

    def import_key(
        self,
        algorithm: KeyAlgorithm,
        material: bytes,
        usage: KeyUsage,
        *,
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        _check_supported(algorithm, usage, label)
        if not isinstance(material, bytes):
            raise InvalidInput("key material must be bytes")
        key_id = _new_id()
        if algorithm.is_asymmetric:
            private_key = _load_private(algorithm, material)
            private_attrs, public_attrs = objects.asymmetric_attributes(private_key)
        else:
            policy.check_secret(algorithm, material)
            private_attrs, public_attrs = objects.secret_attributes(algorithm, material), None
        with self._lock, token_errors("key import"):
            if public_attrs is not None:
                public_attrs.update(objects.public_template(key_id, label, usage))
                self._session.create_object(public_attrs)
                private_attrs.update(objects.private_template(key_id, label, usage, exportable))
            else:
                private_attrs.update(objects.secret_template(key_id, label, usage, exportable))
            try:
                self._session.create_object(private_attrs)
            except Exception:
                self._destroy_objects(key_id)
                raise
            return self._find(_handle_of(key_id)).info()

    # -- reading -----------------------------------------------------------------------

    def info(self, handle: str) -> KeyInfo:
        with self._lock:
            self._keys.pop(handle, None)  # a fresh look: info answers whether the key exists
            return self._find(handle).info()

    def list(self) -> list[KeyInfo]:
        infos = []
        with self._lock, token_errors("listing keys"):
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
                query = {Attribute.CLASS: object_class, Attribute.TOKEN: True}
                for obj in list(self._session.get_objects(query)):
                    key_id = bytes(obj[Attribute.ID])
                    if key_id.startswith(RESERVED_ID_PREFIX):
                        continue  # the store's own key encryption keys
                    try:
                        infos.append(self._find(_handle_of(key_id)).info())
                    except (UnsupportedAlgorithm, KeyNotFound):
                        continue  # a token object trustfleet cannot use
        return sorted(infos, key=lambda i: (i.created_at, i.handle))

    @_fresh
    def public_key(self, handle: str) -> PublicKey:
        with self._lock:
            key = self._find(handle)
            if key.public is None:
                raise InvalidInput(f"key {handle} is a secret key and has no public key")
            with token_errors("reading a public key"):
                return objects.public_key_of(key.algorithm, key.public)

    def _find(self, handle: str) -> _Key:
        known = self._keys.get(handle)
        if known is not None:
            return known
        key_id = _id_of(handle)
        if key_id.startswith(RESERVED_ID_PREFIX):
            raise KeyNotFound(f"no key has handle {handle!r}")
        found: pkcs11.Key | None = None
        public: pkcs11.PublicKey | None = None
        with token_errors("key lookup"):
            for obj in self._session.get_objects({Attribute.ID: key_id, Attribute.TOKEN: True}):
                if isinstance(obj, pkcs11.PublicKey):
                    public = obj
                elif isinstance(obj, pkcs11.PrivateKey | pkcs11.SecretKey):
                    found = obj
            if found is None:
                raise KeyNotFound(f"no key has handle {handle!r}")
            key = self._describe(handle, key_id, found, public)
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.clear()
        self._keys[handle] = key
        return key

    def _describe(
        self, handle: str, key_id: bytes, obj: pkcs11.Key, public: pkcs11.PublicKey | None
    ) -> _Key:
        algorithm = objects.algorithm_of_objects(obj, public)
        flags = objects.flags_of(obj)
        wanted = [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.LABEL, *flags.values()]
        attrs = obj.get_attributes(wanted)
        usage = KeyUsage.NONE
        for flag, attribute in flags.items():
            if attrs.get(attribute):
                usage |= flag
        if attrs.get(Attribute.EXTRACTABLE):
            usage |= KeyUsage.WRAPPABLE
        return _Key(
            handle=handle,
            obj=obj,
            public=public,
            algorithm=algorithm,
            usage=usage & policy.POSSIBLE_USAGE[algorithm],
            exportable=not attrs.get(Attribute.SENSITIVE, True),
            label=str(attrs.get(Attribute.LABEL) or ""),
            created_at=_created_at(key_id),
        )

    def _use(self, handle: str, needed: KeyUsage) -> _Key:
        key = self._find(handle)
        policy.require(handle, key.usage, needed)
        return key

    # -- private and secret operations -------------------------------------------------

    @_fresh
    def sign(self, handle: str, data: bytes) -> bytes:
        with self._lock:
            key = self._use(handle, KeyUsage.SIGN)
            obj = _able(key, SignMixin)
            with token_errors("signing"):
                if key.algorithm is KeyAlgorithm.EC_P256:
                    raw = obj.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
                    half = len(raw) // 2
                    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
                    return encode_dss_signature(r, s)
                if key.algorithm is KeyAlgorithm.ED25519:
                    return obj.sign(data, mechanism=Mechanism.EDDSA)
                return obj.sign(
                    data,
                    mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, PSS_SALT_LENGTH),
                )

    @_fresh
    def decrypt(self, handle: str, ciphertext: bytes, *, info: bytes = b"") -> bytes:
        with self._lock:
            key = self._use(handle, KeyUsage.DECRYPT)
            if isinstance(key.obj, pkcs11.SecretKey):
                return _gcm_open(key, ciphertext, info)
            _require_rsa(key, "decrypt")
            with token_errors("RSA-OAEP decryption", failure=DecryptionFailed):
                return _single(
                    _able(key, DecryptMixin).decrypt(
                        ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_oaep(info)
                    )
                )

    @_fresh
    def encrypt(self, handle: str, plaintext: bytes, *, info: bytes = b"") -> bytes:
        with self._lock:
            key = self._use(handle, KeyUsage.ENCRYPT)
            _require_aead(key)
            secret = _able(key, EncryptMixin)
            nonce = os.urandom(NONCE_SIZE)
            with token_errors("AES-GCM encryption"):
                sealed = secret.encrypt(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, info or None, TAG_BITS),
                )
            return nonce + _single(sealed)

    @_fresh
    def mac(self, handle: str, data: bytes) -> bytes:
        with self._lock:
            key = self._use(handle, KeyUsage.MAC)
            secret = _able(key, SignMixin)
            mechanism = {
                KeyAlgorithm.AES_128: Mechanism.AES_CMAC,
                KeyAlgorithm.AES_256: Mechanism.AES_CMAC,
                KeyAlgorithm.TDES: Mechanism.DES3_CMAC,
                KeyAlgorithm.HMAC_SHA256: Mechanism.SHA256_HMAC,
            }[key.algorithm]
            with token_errors("MAC"):
                return secret.sign(data, mechanism=mechanism)

    @_fresh
    def wrap(self, handle: str, *, under: str | PublicKey, info: bytes = b"") -> bytes:
        if under == handle:
            raise InvalidInput("a key cannot be wrapped under itself")
        with self._lock:
            key = self._use(handle, KeyUsage.WRAPPABLE)
            if not isinstance(under, str):
                return self._wrap_to_public(key, under, info)
            kek = self._use(under, KeyUsage.WRAP)
            _require_aes(kek)
            if info:
                raise InvalidInput("AES key wrap (RFC 5649) cannot bind info; pass info=b''")
            with token_errors("key wrap"):
                return _able(kek, WrapMixin).wrap_key(key.obj, mechanism=Mechanism.AES_KEY_WRAP_PAD)

    def _wrap_to_public(self, key: _Key, recipient: PublicKey, info: bytes) -> bytes:
        if not isinstance(recipient, rsa.RSAPublicKey):
            raise UnsupportedAlgorithm(
                "the PKCS#11 backend wraps to RSA public keys only (RSA-OAEP inside the token);"
                " HPKE and SM2 key transport cannot run inside a token"
            )
        crypto.algorithm_of(recipient)  # refuses sizes trustfleet does not accept
        numbers = recipient.public_numbers()
        attrs = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.WRAP: True,
            Attribute.MODULUS: objects.int_bytes(numbers.n),
            Attribute.PUBLIC_EXPONENT: objects.int_bytes(numbers.e),
        }
        with token_errors("RSA-OAEP key wrap"):
            wrapping = self._session.create_object(attrs)
            try:
                assert isinstance(wrapping, WrapMixin)
                return wrapping.wrap_key(
                    key.obj, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_oaep_any(info)
                )
            finally:
                wrapping.destroy()

    def unwrap(
        self,
        wrapping_handle: str,
        wrapped: bytes,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        *,
        info: bytes = b"",
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        _check_supported(algorithm, usage, label)
        if algorithm in (KeyAlgorithm.EC_P256, KeyAlgorithm.ED25519):
            raise UnsupportedAlgorithm(
                f"the PKCS#11 backend cannot unwrap {algorithm.value} private keys: the token"
                " cannot rebuild their public half"
            )
        with self._lock:
            kek = self._use(wrapping_handle, KeyUsage.UNWRAP)
            if isinstance(kek.obj, pkcs11.SecretKey):
                _require_aes(kek)
                if info:
                    raise InvalidInput("AES key wrap (RFC 5649) cannot bind info; pass info=b''")
                mechanism, param = Mechanism.AES_KEY_WRAP_PAD, None
            else:
                _require_rsa(kek, "unwrap")
                mechanism, param = Mechanism.RSA_PKCS_OAEP, _oaep(info)
            return self._unwrap(kek, wrapped, algorithm, usage, label, exportable, mechanism, param)

    def _unwrap(
        self,
        kek: _Key,
        wrapped: bytes,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        label: str,
        exportable: bool,
        mechanism: Mechanism,
        param: Any,
    ) -> KeyInfo:
        key_id = _new_id()
        if algorithm.is_asymmetric:
            object_class = ObjectClass.PRIVATE_KEY
            template = objects.private_template(key_id, label, usage, exportable)
            # python-pkcs11 adds every capability attribute; these are invalid on private keys
            template.update({a: DEFAULT for a in objects.PUBLIC_ONLY_ATTRIBUTES})
        else:
            object_class = ObjectClass.SECRET_KEY
            template = objects.secret_template(key_id, label, usage, exportable)
        key_type = objects.key_type_for_unwrap(algorithm, wrapped)
        with token_errors("key unwrap", failure=DecryptionFailed):
            obj = _able(kek, UnwrapMixin).unwrap_key(
                object_class,
                key_type,
                wrapped,
                mechanism=mechanism,
                mechanism_param=param,
                store=True,
                template=template,
            )
        try:
            if algorithm.is_asymmetric:
                self._add_rsa_public(obj, key_id, label, usage)
            found = self._find(_handle_of(key_id))
            if found.algorithm is not algorithm:
                raise InvalidKey(f"the unwrapped key is not an {algorithm.value} key")
            return found.info()
        except Exception:
            self._destroy_objects(key_id)
            raise

    def _add_rsa_public(
        self, private: pkcs11.Key, key_id: bytes, label: str, usage: KeyUsage
    ) -> None:
        attrs = private.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        public = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: attrs[Attribute.MODULUS],
            Attribute.PUBLIC_EXPONENT: attrs[Attribute.PUBLIC_EXPONENT],
            **objects.public_template(key_id, label, usage),
        }
        with token_errors("key unwrap"):
            self._session.create_object(public)

    def derive(
        self,
        handle: str,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        *,
        peer_public: PublicKey | None = None,
        info: bytes = b"",
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        with self._lock:
            self._find(handle)
        raise UnsupportedAlgorithm(_NO_DERIVE)

    @_fresh
    def export(self, handle: str) -> bytes:
        with self._lock:
            key = self._find(handle)
            if not key.exportable:
                raise KeyNotExportable(f"key {handle} is not exportable")
            with token_errors("export"):
                if isinstance(key.obj, pkcs11.SecretKey):
                    return bytes(key.obj[Attribute.VALUE])
                return crypto.private_key_to_der(objects.private_key_of(key.algorithm, key.obj))

    def destroy(self, handle: str) -> None:
        key_id = _id_of(handle)
        with self._lock:
            self._keys.pop(handle, None)
            self._find(handle)
            self._keys.pop(handle, None)
            self._destroy_objects(key_id)

    def _destroy_objects(self, key_id: bytes) -> None:
        with token_errors("destroy"):
            query = {Attribute.ID: key_id, Attribute.TOKEN: True}
            for obj in list(self._session.get_objects(query)):
                obj.destroy()


# -- session and errors ----------------------------------------------------------------


def _find_token(lib: Any, module_path: str, token_label: str) -> pkcs11.Token:
    """The token; if it is missing and no store of this process uses the module, initialise
    the module again and look once more: modules such as SoftHSM2 only see the tokens that
    existed when the process first initialised them (C_Initialize), and re-initialising
    would close other stores' sessions, hence only when there are none."""
    for attempt in range(2):
        try:
            token: pkcs11.Token = lib.get_token(token_label=token_label)
            return token
        except p11.NoSuchToken:
            if attempt or _OPEN_STORES.get(module_path, 0):
                break
            with suppress(p11.PKCS11Error):
                lib.reinitialize()
    raise ConfigurationError(f"no PKCS#11 token is labelled {token_label!r}")


def _open_session(token: pkcs11.Token, user_pin: str) -> pkcs11.Session:
    try:
        return token.open(rw=True, user_pin=user_pin)
    except p11.UserAlreadyLoggedIn:
        # Login is per application: another store in this process already logged in.
        return token.open(rw=True)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked):
        raise ConfigurationError(
            "the PKCS#11 user PIN was refused (pkcs11_user_pin is wrong or locked)"
        ) from None
    except p11.PKCS11Error as exc:
        raise ConfigurationError(f"cannot open a PKCS#11 session: {type(exc).__name__}") from None


@contextmanager
def token_errors(what: str, *, failure: type[CryptoError] | None = None) -> Iterator[None]:
    """pkcs11 exceptions as trustfleet errors; names of exceptions only, never data."""
    try:
        yield
    except TrustfleetError:
        raise
    except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
        raise _StaleHandle(f"{what}: the token no longer has this object") from None
    except p11.AttributeSensitive:
        raise KeyNotExportable(f"{what}: the token keeps this value secret") from None
    except (p11.KeyUnextractable, p11.KeyNotWrappable) as exc:
        raise KeyUsageNotAllowed(f"{what}: the token refused ({type(exc).__name__})") from None
    except (p11.MechanismInvalid, p11.MechanismParamInvalid, p11.ArgumentsBad) as exc:
        raise UnsupportedAlgorithm(
            f"{what}: this PKCS#11 token does not support the mechanism or its parameters"
            f" ({type(exc).__name__})"
        ) from None
    except (
        p11.EncryptedDataInvalid,
        p11.EncryptedDataLenRange,
        p11.WrappedKeyInvalid,
        p11.WrappedKeyLenRange,
        p11.DataLenRange,
        p11.GeneralError,  # SoftHSM2's answer to a bad GCM tag
    ) as exc:
        if failure is None:
            raise KeyStoreError(
                f"{what} failed in the PKCS#11 token ({type(exc).__name__})"
            ) from None
        raise failure(f"{what} failed: the input does not authenticate or decrypt") from None
    except (p11.TemplateInconsistent, p11.AttributeValueInvalid, p11.KeySizeRange) as exc:
        raise InvalidKey(f"{what}: the token rejected the key ({type(exc).__name__})") from None
    except p11.PKCS11Error as exc:
        raise KeyStoreError(f"{what} failed in the PKCS#11 token ({type(exc).__name__})") from None


# -- ids, handles, templates -----------------------------------------------------------


def _new_id() -> bytes:
    micros = int(datetime.now(UTC).timestamp() * 1_000_000)
    return ID_MARKER + struct.pack(">Q", micros) + os.urandom(6)


def _handle_of(key_id: bytes) -> str:
    return HANDLE_PREFIX + key_id.hex()


def _id_of(handle: str) -> bytes:
    if isinstance(handle, str) and handle.startswith(HANDLE_PREFIX):
        try:
            key_id = bytes.fromhex(handle.removeprefix(HANDLE_PREFIX))
        except ValueError:
            pass
        else:
            if key_id:
                return key_id
    raise KeyNotFound(f"no key has handle {handle!r}")


def _created_at(key_id: bytes) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    if len(key_id) == 16 and key_id.startswith(ID_MARKER):
        (micros,) = struct.unpack(">Q", key_id[2:10])
        return epoch + timedelta(microseconds=micros)
    return epoch  # a key trustfleet did not create


def _check_supported(algorithm: KeyAlgorithm, usage: KeyUsage, label: str) -> None:
    policy.check_new_key(algorithm, usage, label)
    if algorithm in UNSUPPORTED:
        raise UnsupportedAlgorithm(
            f"the PKCS#11 backend does not support {UNSUPPORTED[algorithm]} keys (SoftHSM2 has"
            " no mechanism for them); use the soft backend"
        )
    if KeyUsage.DERIVE in usage:
        raise UnsupportedAlgorithm(_NO_DERIVE)
    if algorithm is KeyAlgorithm.EC_P256 and usage & (KeyUsage.DECRYPT | KeyUsage.UNWRAP):
        raise UnsupportedAlgorithm(
            "the PKCS#11 backend cannot decrypt or unwrap with EC keys (HPKE cannot run inside"
            " the token); use RSA or the soft backend"
        )


def _load_private(algorithm: KeyAlgorithm, material: bytes) -> PrivateKey:
    key = crypto.load_private_key(material)
    if crypto.algorithm_of(key) is not algorithm:
        raise InvalidKey(f"the key material is not an {algorithm.value} private key")
    return key


# -- small checks ----------------------------------------------------------------------


def _able(key: _Key, capability: type[_Capability]) -> _Capability:
    """The key object as ``capability``; python-pkcs11 adds a mixin only when the token
    grants the matching attribute (CKA_SIGN...), so a missing one is a usage refusal."""
    if not isinstance(key.obj, capability):
        raise KeyUsageNotAllowed(f"the token does not allow this operation with key {key.handle}")
    return key.obj


def _require_aead(key: _Key) -> None:
    if key.algorithm not in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        raise UnsupportedAlgorithm(f"{key.algorithm.value} keys do not encrypt (no AEAD mode)")


def _require_aes(key: _Key) -> None:
    if key.algorithm not in policy.KEY_WRAP_ALGORITHMS:
        raise UnsupportedAlgorithm(
            f"key {key.handle} is {key.algorithm.value}; key wrapping (RFC 5649) needs an AES key"
        )


def _require_rsa(key: _Key, what: str) -> None:
    if key.algorithm not in (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072):
        raise UnsupportedAlgorithm(
            f"the PKCS#11 backend cannot {what} with {key.algorithm.value} keys inside the token"
        )


def _oaep(label: bytes) -> tuple[Mechanism, MGF, bytes | None]:
    return (Mechanism.SHA256, MGF.SHA256, label or None)


def _gcm_open(key: _Key, sealed: bytes, info: bytes) -> bytes:
    _require_aead(key)
    if len(sealed) < NONCE_SIZE + TAG_BITS // 8:
        raise DecryptionFailed("the ciphertext is shorter than its nonce and tag")
    nonce, body = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
    with token_errors("AES-GCM decryption", failure=DecryptionFailed):
        return _single(
            _able(key, DecryptMixin).decrypt(
                body, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, info or None)
            )
        )


def _oaep_any(label: bytes) -> Any:
    # python-pkcs11 types wrap_key's parameter as bytes but takes the OAEP tuple at runtime
    return _oaep(label)


def _single(result: bytes | Iterator[bytes]) -> bytes:
    """python-pkcs11 returns bytes for bytes input (iterators only for chunked input)."""
    assert isinstance(result, bytes)
    return result
