"""Where each key lives and where each of its operations runs, with a PKCS#11 token.

With the PKCS#11 backend every key is in one of two custodies:

* **token**: an object inside the token, non-extractable. Long-term signing keys (CA keys,
  the TMK work key) are generated there when the token can generate and sign with their
  algorithm, and sign there.
* **sealed**: a row of the key store's table whose material is wrapped under a key
  encryption key (KEK) that is itself a non-extractable key inside the token. TMKs, working
  keys, ticket keys and every key whose operations the token cannot run all are.

For each operation on a sealed key the store asks the token (``C_GetMechanismInfo``)
whether it has the mechanism; if it does, the key is unwrapped *inside the token* into a
session object and the operation runs there; if not, the store either unwraps the key into
process memory for that one operation (policy ``sealed``, the default) or refuses with an
error naming the missing mechanism (policy ``in-token``).

This module holds the vocabulary (operation names), the tables that map an operation and
an algorithm to the PKCS#11 mechanism it needs, and what the token reported. It does no
I/O: :mod:`trustfleet.keystore.sealed` applies it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pkcs11 import KeyType, Mechanism, MechanismFlag

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import ConfigurationError, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyUsage

# -- policies -----------------------------------------------------------------------------

SEALED = "sealed"
IN_TOKEN = "in-token"  # noqa: S105 - a policy name, not a secret
POLICIES = (SEALED, IN_TOKEN)


def check_policy(policy: str) -> str:
    value = policy.strip().lower()
    if value not in POLICIES:
        raise ConfigurationError(
            f"unknown pkcs11_policy {policy!r}; use one of {', '.join(POLICIES)}"
        )
    return value


# -- operations ---------------------------------------------------------------------------

SIGN = "sign"
KCV = "kcv"
MAC = "mac"
ENCRYPT = "encrypt"
DECRYPT = "decrypt"
BLOCK_CIPHER = "block-cipher"
WRAP = "wrap"  # this key leaves wrapped: to a public key or under another stored key
KEY_WRAP = "key-wrap"  # other keys wrapped under this one (RFC 5649)
UNWRAP = "unwrap"  # keys imported wrapped under this one
TR31 = "tr31"  # TR-31 key blocks: this key carried in one, or protecting them
DERIVE = "derive"
EXPORT = "export"

_BLOCK_CIPHERS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES})
_TR31_KEYS = frozenset(
    {KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES, KeyAlgorithm.HMAC_SHA256}
)
_TR31_KBPKS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES})
_AEAD_KEYS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.SM4})
_KCV_KEYS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.TDES})


def operations_of(algorithm: KeyAlgorithm, usage: KeyUsage, exportable: bool) -> list[str]:
    """The operations a key of this algorithm, usage and exportability can take part in."""
    u = KeyUsage
    ops: list[str] = []
    if u.SIGN in usage:
        ops.append(SIGN)
    if not algorithm.is_asymmetric:
        if algorithm in _KCV_KEYS:
            ops.append(KCV)
        if u.MAC in usage:
            ops.append(MAC)
        if u.ENCRYPT in usage and algorithm in _AEAD_KEYS:
            ops.append(ENCRYPT)
        if u.DECRYPT in usage and algorithm in _AEAD_KEYS:
            ops.append(DECRYPT)
        if algorithm in _BLOCK_CIPHERS | {KeyAlgorithm.SM4} and usage & (u.ENCRYPT | u.DECRYPT):
            ops.append(BLOCK_CIPHER)
        if u.WRAP in usage:
            ops.append(KEY_WRAP)
        if (u.WRAP | u.UNWRAP) & usage and algorithm in _TR31_KBPKS:
            ops.append(TR31)
        if u.WRAPPABLE in usage and algorithm in _TR31_KEYS and TR31 not in ops:
            ops.append(TR31)
    elif u.DECRYPT in usage:
        ops.append(DECRYPT)
    if u.UNWRAP in usage:
        ops.append(UNWRAP)
    if u.WRAPPABLE in usage:
        ops.append(WRAP)
    if u.DERIVE in usage:
        ops.append(DERIVE)
    if exportable:
        ops.append(EXPORT)
    return ops


# -- mechanisms ---------------------------------------------------------------------------

CKM_HKDF_DERIVE = 0x0000402A  # PKCS#11 3.0; python-pkcs11 has no name for it


def mechanism_name(mechanism: int) -> str:
    if mechanism == CKM_HKDF_DERIVE:
        return "CKM_HKDF_DERIVE"
    try:
        return "CKM_" + Mechanism(mechanism).name.lstrip("_")
    except ValueError:
        return f"mechanism 0x{mechanism:08x}"


@dataclass(frozen=True, slots=True)
class Need:
    """A mechanism and the function (flag) an operation needs from it."""

    mechanism: int
    flag: MechanismFlag

    @property
    def name(self) -> str:
        return mechanism_name(self.mechanism)


def _need(mechanism: Mechanism | int, flag: MechanismFlag) -> Need:
    return Need(int(mechanism), flag)


_F = MechanismFlag
_AES = (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256)

#: (operation, algorithm) -> what running it inside the token takes (a key loaded into the
#: token is needed too; see :data:`LOAD_TYPES`)
TOKEN_OPERATIONS: dict[tuple[str, KeyAlgorithm], Need] = {
    **{(KCV, a): _need(Mechanism.AES_CMAC, _F.SIGN) for a in _AES},
    (KCV, KeyAlgorithm.TDES): _need(Mechanism.DES3_ECB, _F.ENCRYPT),
    **{(MAC, a): _need(Mechanism.AES_CMAC, _F.SIGN) for a in _AES},
    (MAC, KeyAlgorithm.TDES): _need(Mechanism.DES3_CMAC, _F.SIGN),
    (MAC, KeyAlgorithm.HMAC_SHA256): _need(Mechanism.SHA256_HMAC, _F.SIGN),
    **{(ENCRYPT, a): _need(Mechanism.AES_GCM, _F.ENCRYPT) for a in _AES},
    **{(DECRYPT, a): _need(Mechanism.AES_GCM, _F.DECRYPT) for a in _AES},
}

#: block cipher mechanisms by algorithm family and mode
BLOCK_MECHANISMS: dict[tuple[str, str], Mechanism] = {
    ("aes", "ecb"): Mechanism.AES_ECB,
    ("aes", "cbc"): Mechanism.AES_CBC,
    ("tdes", "ecb"): Mechanism.DES3_ECB,
    ("tdes", "cbc"): Mechanism.DES3_CBC,
}

#: RSA-OAEP with SHA-256, MGF1-SHA256 and the transport label: the token lists the
#: mechanism, but only trying tells whether it takes these parameters
OAEP_SHA256 = "CKM_RSA_PKCS_OAEP with CKM_SHA256, CKG_MGF1_SHA256 and a label"

#: secret key types a sealed key is unwrapped as when it is loaded into the token
LOAD_TYPES: dict[KeyAlgorithm, KeyType] = {
    KeyAlgorithm.AES_128: KeyType.AES,
    KeyAlgorithm.AES_256: KeyType.AES,
    KeyAlgorithm.TDES: KeyType.DES2,  # DES3 for 24-byte keys
    KeyAlgorithm.HMAC_SHA256: KeyType.GENERIC_SECRET,
}

#: mechanisms that generate a secret key inside the token
SECRET_GENERATION: dict[KeyAlgorithm, Mechanism] = {
    KeyAlgorithm.AES_128: Mechanism.AES_KEY_GEN,
    KeyAlgorithm.AES_256: Mechanism.AES_KEY_GEN,
    KeyAlgorithm.TDES: Mechanism.DES2_KEY_GEN,
    KeyAlgorithm.HMAC_SHA256: Mechanism.GENERIC_SECRET_KEY_GEN,
}

#: (key pair generation, signature) mechanisms of the signing keys the token may hold
SIGNING: dict[KeyAlgorithm, tuple[Mechanism, Mechanism]] = {
    KeyAlgorithm.EC_P256: (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
    KeyAlgorithm.ED25519: (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA),
    KeyAlgorithm.RSA_2048: (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS_PSS),
    KeyAlgorithm.RSA_3072: (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.SHA256_RSA_PKCS_PSS),
}

#: why an operation runs in process only: what a token would need for it
_PROCESS_ONLY = {
    TR31: "TR-31 key blocks have no PKCS#11 mechanism (a payment HSM makes them with its own"
    " commands)",
    DERIVE: "HKDF-SHA256 needs CKM_HKDF_DERIVE",
    KEY_WRAP: "RFC 5649 key wrap under a stored key runs in process (CKM_AES_KEY_WRAP_KWP is"
    " not used for it)",
    UNWRAP: "importing a wrapped key runs in process (the result is sealed at once)",
    EXPORT: "exporting puts the key in clear in process memory",
}
_NO_STANDARD_MECHANISM = {
    KeyAlgorithm.SM2: "SM2 has no standard PKCS#11 mechanism",
    KeyAlgorithm.SM4: "SM4 has no standard PKCS#11 mechanism",
    KeyAlgorithm.HMAC_SM3: "HMAC-SM3 has no standard PKCS#11 mechanism",
    KeyAlgorithm.X25519: "X25519 key agreement with HPKE needs CKM_HKDF_DERIVE",
}


class Mechanisms:
    """What one token reported for each mechanism (read once per store), and parameter
    sets it refused when asked (learned at run time, for this process)."""

    def __init__(self, flags: Mapping[int, int]) -> None:
        self._flags = dict(flags)
        self._refused: set[str] = set()
        self._accepted: set[str] = set()
        self._lock = threading.Lock()

    def supports(self, mechanism: Mechanism | int, flag: MechanismFlag) -> bool:
        return bool(self._flags.get(int(mechanism), 0) & int(flag))

    def has(self, need: Need) -> bool:
        return self.supports(need.mechanism, need.flag)

    def missing(self, needs: Iterable[Need]) -> list[str]:
        return [n.name for n in needs if not self.has(n)]

    def refuse(self, what: str) -> None:
        with self._lock:
            self._refused.add(what)

    def accept(self, what: str) -> None:
        with self._lock:
            self._accepted.add(what)

    def refused(self, what: str) -> bool:
        return what in self._refused

    def accepted(self, what: str) -> bool:
        return what in self._accepted

    def names(self) -> list[str]:
        return sorted(mechanism_name(m) for m in self._flags)


def token_need(operation: str, algorithm: KeyAlgorithm) -> Need | None:
    return TOKEN_OPERATIONS.get((operation, algorithm))


def block_need(algorithm: KeyAlgorithm, mode: str, decrypt: bool) -> Need | None:
    family = "aes" if algorithm in _AES else "tdes" if algorithm is KeyAlgorithm.TDES else ""
    mechanism = BLOCK_MECHANISMS.get((family, mode))
    if mechanism is None:
        return None
    return _need(mechanism, _F.DECRYPT if decrypt else _F.ENCRYPT)


def process_reason(operation: str, algorithm: KeyAlgorithm, need: Need | None = None) -> str:
    """Why ``operation`` on a key of ``algorithm`` cannot run in the token, naming the
    mechanism it lacks."""
    if need is not None:
        return f"the token has no {need.name} ({need.flag.name} is not among its functions)"
    if algorithm in _NO_STANDARD_MECHANISM:
        return _NO_STANDARD_MECHANISM[algorithm]
    return _PROCESS_ONLY.get(operation, f"the token has no mechanism for {operation}")


HPKE_NEEDS = (
    _need(Mechanism.ECDH1_DERIVE, _F.DERIVE),
    Need(CKM_HKDF_DERIVE, _F.DERIVE),
    _need(Mechanism.AES_GCM, _F.ENCRYPT),
)


def transport_reason(recipient: KeyAlgorithm, mechanisms: Mechanisms) -> str:
    """Why key transport to a public key of ``recipient`` runs in process, naming the
    mechanism the token lacks."""
    if recipient in (KeyAlgorithm.EC_P256, KeyAlgorithm.X25519):
        missing = mechanisms.missing(HPKE_NEEDS)
        if missing:
            return (
                "HPKE key transport needs CKM_ECDH1_DERIVE, CKM_HKDF_DERIVE and CKM_AES_GCM;"
                f" this token has no {' and no '.join(missing)}"
            )
        return "HPKE key transport runs in process only (no PKCS#11 composition of it here)"
    if recipient is KeyAlgorithm.SM2:
        return "SM2 key transport has no standard PKCS#11 mechanism"
    if not mechanisms.supports(Mechanism.RSA_PKCS_OAEP, _F.WRAP):
        return "the token has no CKM_RSA_PKCS_OAEP for wrapping"
    return f"the token refused {OAEP_SHA256}"


def refuse_in_token(what: str, reason: str) -> UnsupportedAlgorithm:
    """The error of the ``in-token`` policy for an operation the token cannot run."""
    return UnsupportedAlgorithm(
        f"pkcs11_policy is in-token and {what} cannot run inside the token: {reason}"
    )
