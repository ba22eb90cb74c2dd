"""The token as the root of trust: key encryption keys (KEKs) that never leave the token,
and the sealed format of the key store's rows under them.

A KEK is a pair of token objects sharing one ``CKA_ID`` (``b"tfkek"`` + creation time +
random bytes): an AES-256 key that can only wrap and unwrap (``CKA_WRAP``/``CKA_UNWRAP``;
not sensitive-readable, not extractable, no encrypt or decrypt) and an HMAC-SHA256 key that
can only sign and verify. Its id in the rows (``kek_id``) is ``tok-`` + 12 hex digits of
the SHA-256 of that ``CKA_ID``.

A sealed row's ``wrapped`` column is::

    mechanism (1 byte) || form (1) || tag (32) || [IV (16), AES-CBC-PAD only] || C_WrapKey output

The material is wrapped *by the token* (``C_WrapKey``) with the first of
``CKM_AES_KEY_WRAP_KWP`` (RFC 5649), ``CKM_AES_KEY_WRAP_PAD`` (SoftHSM2's RFC 5649) and
``CKM_AES_CBC_PAD`` the token lists for both wrapping and unwrapping; the byte names it, so
a row is always unwrapped with the mechanism that wrapped it. The form byte is ``R`` when
the wrapped value is the key itself (a key the token can load and use), ``L`` when it is a
4-byte length and the material (private keys in PKCS#8, secrets whose length is not a
multiple of 8): SoftHSM2's ``CKM_AES_KEY_WRAP_PAD`` gives back such values padded with zero
bytes, and the length says where the material ends. The tag is HMAC-SHA256,
computed in the token with the KEK's HMAC key, over a domain label, the row's binding (its
handle, algorithm, usage, exportability and public key: the soft store's associated data)
and everything after the tag: editing a row's flags, or moving ``wrapped`` to another row,
makes the key fail with KeyIntegrityError, as in the soft store. (Key wrap has no
associated data, hence the separate tag; it is checked before every unwrap.)

Keys reach process memory only through :meth:`TokenKeyring.open` (unwrapped into a
non-sensitive session object whose value is read and which is destroyed at once); keys used
inside the token go there through :meth:`TokenKeyring.load` (``C_UnwrapKey`` into a
sensitive session object) and never pass through process memory. Keys made inside the
token are sealed with :meth:`TokenKeyring.seal_object` without leaving it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import SignMixin, UnwrapMixin, WrapMixin

from trustfleet.errors import ConfigurationError, KeyStoreError, MasterKeyError
from trustfleet.keystore.master import KeyIntegrityError

if TYPE_CHECKING:
    from trustfleet.keystore.pkcs11 import Pkcs11KeyStore

KEK_LABEL = "trustfleet-kek"
KEK_MAC_LABEL = "trustfleet-kek-mac"
KEK_ID_PREFIX = "tok-"
KEK_OBJECT_ID_PREFIX = b"tfkek"  # = pkcs11.RESERVED_ID_PREFIX
TAG_SIZE = 32
IV_SIZE = 16
KEK_BITS = 256
MAC_KEY_BITS = 256
_DOMAIN = b"trustfleet-sealed-v1"

#: format byte -> wrapping mechanism, in order of preference
WRAP_MECHANISMS: tuple[tuple[bytes, Mechanism], ...] = (
    (b"K", Mechanism.AES_KEY_WRAP_KWP),
    (b"P", Mechanism.AES_KEY_WRAP_PAD),
    (b"C", Mechanism.AES_CBC_PAD),
)
_BY_MARKER = dict(WRAP_MECHANISMS)
RAW = b"R"  # the wrapped value is the key
FRAMED = b"L"  # the wrapped value is a 4-byte length and the material
_WRAP_AND_UNWRAP = MechanismFlag.WRAP | MechanismFlag.UNWRAP

#: attributes a key gets in no case here (each template sets the ones it needs)
_NO_FUNCTIONS = {
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}


@dataclass(frozen=True, slots=True)
class _Kek:
    kek_id: str
    object_id: bytes
    wrapping: Any  # a SecretKey with WrapMixin and UnwrapMixin
    tagging: SignMixin


def kek_id_of(object_id: bytes) -> str:
    return KEK_ID_PREFIX + hashlib.sha256(object_id).hexdigest()[:12]


def is_token_kek_id(kek_id: str) -> bool:
    return kek_id.startswith(KEK_ID_PREFIX)


class TokenKeyring:
    """The token's KEKs, newest active: a :class:`~trustfleet.keystore.master.Keyring` whose
    every wrap and unwrap runs inside the token."""

    def __init__(self, token: Pkcs11KeyStore, *, create: bool = True) -> None:
        self._token = token
        self._marker, self._mechanism = _wrap_mechanism(token)
        self._keks: dict[str, _Kek] = {}
        self._reload_lock = threading.Lock()
        self._load_keks()
        if not self._keks and create:
            self.create_kek()
        if not self._keks:
            raise MasterKeyError(
                "the PKCS#11 token holds no trustfleet key encryption key; run `trustfleet"
                " init` or `trustfleet keystore seal` with this token"
            )

    @property
    def wrap_mechanism(self) -> str:
        return "CKM_" + self._mechanism.name

    # -- the Keyring protocol ----------------------------------------------------------

    @property
    def kek_ids(self) -> list[str]:
        return [k.kek_id for k in self._ordered()]

    @property
    def active(self) -> _Kek:
        return self._ordered()[0]

    def has(self, kek_id: str) -> bool:
        return kek_id in self._keks

    def reload(self) -> TokenKeyring:
        """Look for KEKs again (another node may have made one); the same keyring."""
        with self._reload_lock:
            self._load_keks()
        return self

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """Material from process memory, sealed: it enters the token as a session object
        that is wrapped under the active KEK and destroyed."""
        form = RAW if plaintext and len(plaintext) % 8 == 0 else FRAMED
        value = plaintext if form == RAW else struct.pack(">I", len(plaintext)) + plaintext
        template = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.VALUE: value,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            **_NO_FUNCTIONS,
        }
        with self._token.lock, _errors("sealing a key"):
            carrier = self._token.session.create_object(template)
            try:
                assert isinstance(carrier, pkcs11.SecretKey)
                return self.seal_object(carrier, aad, form=form)
            finally:
                carrier.destroy()

    def seal_object(
        self, key: pkcs11.SecretKey, aad: bytes, *, form: bytes = RAW
    ) -> tuple[str, bytes]:
        """A secret key object of the token (extractable), sealed without leaving it."""
        kek = self.active
        iv = os.urandom(IV_SIZE) if self._marker == b"C" else b""
        header = self._marker + form
        with self._token.lock, _errors("sealing a key"):
            wrapped = kek.wrapping.wrap_key(
                key, mechanism=self._mechanism, mechanism_param=iv or None
            )
            body = iv + bytes(wrapped)
            return kek.kek_id, header + self._tag(kek, aad, header + body) + body

    def open(self, kek_id: str, blob: bytes, aad: bytes) -> bytes:
        """The sealed material in process memory: unwrapped by the token into a
        non-sensitive session object, read, and the object destroyed."""
        template = {
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            **_NO_FUNCTIONS,
        }
        with self._token.lock:
            key = self._unwrap(kek_id, blob, aad, KeyType.GENERIC_SECRET, template)
            try:
                with _errors("unsealing a key"):
                    value = bytes(key[Attribute.VALUE])
            finally:
                with _errors("unsealing a key"):
                    key.destroy()
        if blob[1:2] == RAW:
            return value
        (length,) = struct.unpack(">I", value[:4])
        if length > len(value) - 4 or any(value[4 + length :]):
            raise _integrity()
        return value[4 : 4 + length]

    def load(
        self, kek_id: str, blob: bytes, aad: bytes, key_type: KeyType, template: dict[Any, Any]
    ) -> pkcs11.SecretKey:
        """The sealed key unwrapped *inside the token* as a session object with
        ``template`` (never in process memory). The caller destroys it."""
        if blob[1:2] != RAW:
            raise LoadRefused("the sealed material is not a bare key (a private key, or framed)")
        with self._token.lock:
            return self._unwrap(
                kek_id,
                blob,
                aad,
                key_type,
                {Attribute.TOKEN: False, Attribute.PRIVATE: True, **template},
            )

    # -- KEKs --------------------------------------------------------------------------

    def create_kek(self) -> str:
        """A new KEK in the token (it becomes the active one); its kek_id."""
        micros = int(datetime.now(UTC).timestamp() * 1_000_000)
        object_id = KEK_OBJECT_ID_PREFIX + struct.pack(">Q", micros) + os.urandom(3)
        common = {
            Attribute.ID: object_id,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
            **_NO_FUNCTIONS,
        }
        session = self._token.session
        with self._token.lock, _errors("creating the key encryption key"):
            # the HMAC key first: a KEK is looked up by its AES key, which then has its pair
            session.generate_key(
                KeyType.GENERIC_SECRET,
                MAC_KEY_BITS,
                store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template={
                    **common,
                    Attribute.LABEL: KEK_MAC_LABEL,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                },
            )
            session.generate_key(
                KeyType.AES,
                KEK_BITS,
                store=True,
                mechanism=Mechanism.AES_KEY_GEN,
                template={
                    **common,
                    Attribute.LABEL: KEK_LABEL,
                    Attribute.WRAP: True,
                    Attribute.UNWRAP: True,
                },
            )
        self.reload()
        return kek_id_of(object_id)

    def _load_keks(self) -> None:
        found: dict[str, _Kek] = {}
        session = self._token.session
        with self._token.lock, _errors("looking up the key encryption keys"):
            query = {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.TOKEN: True,
                Attribute.LABEL: KEK_LABEL,
            }
            for wrapping in list(session.get_objects(query)):
                object_id = bytes(wrapping[Attribute.ID])
                if not object_id.startswith(KEK_OBJECT_ID_PREFIX):
                    continue
                pair = {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.TOKEN: True,
                    Attribute.ID: object_id,
                    Attribute.LABEL: KEK_MAC_LABEL,
                }
                tagging = next(iter(session.get_objects(pair)), None)
                if tagging is None:
                    continue  # half made (a crash between the two objects): unusable
                if not (isinstance(wrapping, WrapMixin) and isinstance(wrapping, UnwrapMixin)):
                    continue
                if not isinstance(tagging, SignMixin):
                    continue
                kek_id = kek_id_of(object_id)
                found[kek_id] = _Kek(kek_id, object_id, wrapping, tagging)
        self._keks = found

    def _ordered(self) -> list[_Kek]:
        return sorted(self._keks.values(), key=lambda k: k.object_id, reverse=True)

    def _kek(self, kek_id: str) -> _Kek:
        kek = self._keks.get(kek_id)
        if kek is None:
            kek = self.reload()._keks.get(kek_id)
        if kek is None:
            raise MasterKeyError(
                f"a stored key is sealed under the token key {kek_id}, which this PKCS#11"
                f" token does not hold (it holds: {', '.join(self.kek_ids)}); use the token"
                " of this database"
            )
        return kek

    # -- format ------------------------------------------------------------------------

    def _tag(self, kek: _Kek, aad: bytes, body: bytes) -> bytes:
        message = _DOMAIN + struct.pack(">I", len(aad)) + aad + body
        return bytes(kek.tagging.sign(message, mechanism=Mechanism.SHA256_HMAC))

    def verify(self, kek_id: str, blob: bytes, aad: bytes) -> None:
        """Check a sealed row's tag (in the token) without unwrapping anything."""
        with self._token.lock:
            self._checked(kek_id, blob, aad)

    def _checked(
        self, kek_id: str, blob: bytes, aad: bytes
    ) -> tuple[_Kek, Mechanism, bytes, bytes]:
        """(KEK, mechanism, IV, wrapped key) of an authentic sealed row."""
        kek = self._kek(kek_id)
        header, tag, body = blob[:2], blob[2 : 2 + TAG_SIZE], blob[2 + TAG_SIZE :]
        mechanism = _BY_MARKER.get(header[:1])
        iv_size = IV_SIZE if header[:1] == b"C" else 0
        if mechanism is None or header[1:] not in (RAW, FRAMED) or len(body) <= iv_size:
            raise _integrity()
        with _errors("unsealing a key"):
            expected = self._tag(kek, aad, header + body)
        if not hmac.compare_digest(expected, tag):
            raise _integrity()
        return kek, mechanism, body[:iv_size], body[iv_size:]

    def _unwrap(
        self, kek_id: str, blob: bytes, aad: bytes, key_type: KeyType, template: dict[Any, Any]
    ) -> pkcs11.SecretKey:
        kek, mechanism, iv, wrapped = self._checked(kek_id, blob, aad)

        def unwrap(attributes: dict[Any, Any]) -> Any:
            return kek.wrapping.unwrap_key(
                ObjectClass.SECRET_KEY,
                key_type,
                wrapped,
                mechanism=mechanism,
                mechanism_param=iv or None,
                store=False,
                template=attributes,
            )

        try:
            try:
                key = unwrap(template)
            except p11.AttributeReadOnly:
                # openCryptoki 3.8 takes neither CKA_SENSITIVE nor CKA_EXTRACTABLE in an
                # unwrap template: unwrap with its defaults, then set them (PKCS#11 lets
                # sensitive go to true and extractable to false, which is what we ask)
                later = {a: template[a] for a in _SET_AFTER if a in template}
                key = unwrap({a: v for a, v in template.items() if a not in later})
                try:
                    for attribute, value in later.items():
                        if key[attribute] != value:
                            key[attribute] = value
                except p11.PKCS11Error:
                    key.destroy()
                    raise
        except p11.PKCS11Error as exc:
            # the row is authentic (its tag verified): the token would not make this key
            # type or these attributes out of it
            raise LoadRefused(
                f"the token would not unwrap the key as {key_type.name} ({type(exc).__name__})"
            ) from None
        assert isinstance(key, pkcs11.SecretKey)
        return key


_SET_AFTER = (Attribute.SENSITIVE, Attribute.EXTRACTABLE)


class LoadRefused(KeyStoreError):
    """The token would not unwrap a sealed key as the type or with the attributes asked
    (e.g. a 2-key TDES key on a token without CKK_DES2): the operation runs in process."""

    code = "keystore-error"


def _integrity() -> KeyIntegrityError:
    return KeyIntegrityError(
        "a stored key does not authenticate under its token key: its row was modified"
        " (material, algorithm, usage or exportability)"
    )


def _wrap_mechanism(token: Pkcs11KeyStore) -> tuple[bytes, Mechanism]:
    needed = (
        (Mechanism.AES_KEY_GEN, MechanismFlag.GENERATE),
        (Mechanism.GENERIC_SECRET_KEY_GEN, MechanismFlag.GENERATE),
        (Mechanism.SHA256_HMAC, MechanismFlag.SIGN),
    )
    missing = [m for m, flag in needed if not token.mechanisms.supports(m, flag)]
    if missing:
        names = ", ".join("CKM_" + m.name for m in missing)
        raise ConfigurationError(f"this PKCS#11 token cannot hold a key encryption key: no {names}")
    for marker, mechanism in WRAP_MECHANISMS:
        if token.mechanisms.supports(mechanism, _WRAP_AND_UNWRAP):
            return marker, mechanism
    names = ", ".join("CKM_" + m.name for _, m in WRAP_MECHANISMS)
    raise ConfigurationError(
        f"this PKCS#11 token cannot seal keys: it has none of {names} for both wrapping and"
        " unwrapping"
    )


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """pkcs11 exceptions of the sealing calls as KeyStoreError (names only, never data)."""
    try:
        yield
    except p11.PKCS11Error as exc:
        raise KeyStoreError(f"{what} failed in the PKCS#11 token ({type(exc).__name__})") from None
