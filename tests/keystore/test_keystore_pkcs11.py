"""The PKCS#11 token-object layer against a SoftHSM2 token: what the token itself enforces,
and interoperability with the soft store. (The backend as configured puts only signing
keys there; see test_keystore_custody.py.)"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute

from harness import SoftHsmToken
from trustfleet.crypto import KeyAlgorithm, suite_for_algorithm
from trustfleet.errors import ConfigurationError, KeyNotFound, UnsupportedAlgorithm
from trustfleet.keystore import open_keystore
from trustfleet.keystore.base import KeyUsage
from trustfleet.keystore.hsm import HsmKeyStore
from trustfleet.keystore.pkcs11 import Pkcs11KeyStore
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.settings import Settings
from trustfleet.store import Database

pytestmark = pytest.mark.pkcs11

A = KeyAlgorithm
U = KeyUsage


@pytest.fixture
def token_session(softhsm_token: SoftHsmToken) -> Iterator[pkcs11.Session]:
    """An independent session on the same token: what another program could read."""
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label)
    with token.open(rw=False) as session:
        yield session


def _objects(session: pkcs11.Session, handle: str) -> list[pkcs11.Object]:
    key_id = bytes.fromhex(handle.removeprefix("pkcs11:"))
    return list(session.get_objects({Attribute.ID: key_id}))


def test_non_exportable_key_values_cannot_be_read_from_the_token(
    pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session
) -> None:
    for algorithm, usage in ((A.AES_256, U.ENCRYPT), (A.EC_P256, U.SIGN)):
        key = pkcs11_store.generate(algorithm, usage)
        private = [
            o for o in _objects(token_session, key.handle) if not isinstance(o, pkcs11.PublicKey)
        ]
        assert len(private) == 1
        obj = private[0]
        assert obj[Attribute.SENSITIVE] is True
        assert obj[Attribute.EXTRACTABLE] is False
        assert obj[Attribute.TOKEN] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            obj[Attribute.VALUE]


def test_usage_flags_are_token_attributes(
    pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session
) -> None:
    key = pkcs11_store.generate(A.AES_128, U.MAC | U.WRAPPABLE, label="tms-mac")
    (obj,) = _objects(token_session, key.handle)
    assert obj[Attribute.SIGN] is True  # MAC
    assert obj[Attribute.ENCRYPT] is False
    assert obj[Attribute.DECRYPT] is False
    assert obj[Attribute.WRAP] is False
    assert obj[Attribute.EXTRACTABLE] is True  # WRAPPABLE
    assert obj[Attribute.LABEL] == "tms-mac"


def test_an_exportable_key_is_reported_wrappable(pkcs11_store: Pkcs11KeyStore) -> None:
    key = pkcs11_store.generate(A.AES_128, U.MAC, exportable=True)
    assert key.exportable
    assert key.usage == U.MAC | U.WRAPPABLE  # PKCS#11 reveals values only of extractable keys
    assert len(pkcs11_store.export(key.handle)) == 16


def test_a_second_store_on_the_token_sees_the_same_keys(
    pkcs11_store: Pkcs11KeyStore, softhsm_token: SoftHsmToken
) -> None:
    other = Pkcs11KeyStore(softhsm_token.module, softhsm_token.label, softhsm_token.user_pin)
    try:
        key = pkcs11_store.generate(A.ED25519, U.SIGN)
        signature = other.sign(key.handle, b"node 2")
        suite_for_algorithm(A.ED25519).verify(
            pkcs11_store.public_key(key.handle), b"node 2", signature
        )
        other.destroy(key.handle)
        with pytest.raises(KeyNotFound):
            pkcs11_store.sign(key.handle, b"x")
    finally:
        other.close()


def test_unknown_token_and_module_are_configuration_errors(
    softhsm_token: SoftHsmToken,
) -> None:
    with pytest.raises(ConfigurationError, match="token"):
        Pkcs11KeyStore(softhsm_token.module, "no-such-token", softhsm_token.user_pin)
    with pytest.raises(ConfigurationError, match="module"):
        Pkcs11KeyStore("/nonexistent/libpkcs11.so", softhsm_token.label, "1234")


def test_a_wrong_pin_is_refused(softhsm_token: SoftHsmToken) -> None:
    # Login is per process in PKCS#11 and this process is logged in: try from a fresh one.
    script = (
        "import sys\n"
        "from trustfleet.errors import ConfigurationError\n"
        "from trustfleet.keystore.pkcs11 import Pkcs11KeyStore\n"
        "try:\n"
        "    Pkcs11KeyStore(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "except ConfigurationError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    args = [sys.executable, "-c", script, softhsm_token.module, softhsm_token.label]
    wrong = subprocess.run([*args, "0000"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 3, wrong.stderr
    assert "PIN" in wrong.stdout
    right = subprocess.run([*args, softhsm_token.user_pin], capture_output=True, check=False)
    assert right.returncode == 0, right.stderr


def test_derive_and_in_token_less_algorithms_are_refused_clearly(
    pkcs11_store: Pkcs11KeyStore,
) -> None:
    with pytest.raises(UnsupportedAlgorithm, match="HKDF"):
        pkcs11_store.generate(A.EC_P256, U.SIGN | U.DERIVE)
    with pytest.raises(UnsupportedAlgorithm, match="HPKE"):
        pkcs11_store.generate(A.EC_P256, U.DECRYPT)
    signer = pkcs11_store.generate(A.EC_P256, U.SIGN)
    with pytest.raises(UnsupportedAlgorithm, match="HKDF"):
        pkcs11_store.derive(signer.handle, A.AES_128, U.ENCRYPT)


def test_keys_wrapped_by_the_token_unwrap_in_the_soft_store(
    pkcs11_store: Pkcs11KeyStore, db: Database, tmp_path: Path
) -> None:
    """Same wrap formats: a key can move from an HSM to a soft store (and a KEK shared)."""
    from trustfleet.keystore.master import MasterKey, MasterKeyring

    soft = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
    kek_bytes = bytes(range(32))
    hsm_kek = pkcs11_store.import_key(A.AES_256, kek_bytes, U.WRAP)
    soft_kek = soft.import_key(A.AES_256, kek_bytes, U.UNWRAP)

    mac_key = pkcs11_store.generate(A.HMAC_SHA256, U.MAC | U.WRAPPABLE)
    moved = soft.unwrap(
        soft_kek.handle,
        pkcs11_store.wrap(mac_key.handle, under=hsm_kek.handle),
        A.HMAC_SHA256,
        U.MAC,
    )
    assert soft.mac(moved.handle, b"d") == pkcs11_store.mac(mac_key.handle, b"d")

    signer = pkcs11_store.generate(A.EC_P256, U.SIGN | U.WRAPPABLE)
    moved_signer = soft.unwrap(
        soft_kek.handle, pkcs11_store.wrap(signer.handle, under=hsm_kek.handle), A.EC_P256, U.SIGN
    )
    assert soft.public_key(moved_signer.handle) == pkcs11_store.public_key(signer.handle)

    aead = pkcs11_store.import_key(A.AES_128, bytes(16), U.ENCRYPT)
    soft_aead = soft.import_key(A.AES_128, bytes(16), U.DECRYPT)
    sealed = pkcs11_store.encrypt(aead.handle, b"same format", info=b"x")
    assert soft.decrypt(soft_aead.handle, sealed, info=b"x") == b"same format"


def test_rsa_keys_unwrapped_in_the_token_keep_their_public_half(
    pkcs11_store: Pkcs11KeyStore,
) -> None:
    from cryptography.hazmat.primitives import keywrap

    from trustfleet.crypto import generate_private_key, private_key_to_der

    kek = pkcs11_store.import_key(A.AES_256, bytes(range(32)), U.UNWRAP)
    private = generate_private_key(A.RSA_2048)
    wrapped = keywrap.aes_key_wrap_with_padding(bytes(range(32)), private_key_to_der(private))
    key = pkcs11_store.unwrap(kek.handle, wrapped, A.RSA_2048, U.SIGN)
    assert pkcs11_store.public_key(key.handle) == private.public_key()
    suite_for_algorithm(A.RSA_2048).verify(
        private.public_key(), b"m", pkcs11_store.sign(key.handle, b"m")
    )
    with pytest.raises(UnsupportedAlgorithm, match="public half"):
        pkcs11_store.unwrap(kek.handle, wrapped, A.EC_P256, U.SIGN)


def test_open_keystore_picks_pkcs11(
    softhsm_token: SoftHsmToken, db: Database, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        keystore_backend="pkcs11",
        pkcs11_module=softhsm_token.module,
        pkcs11_token_label=softhsm_token.label,
        pkcs11_user_pin=softhsm_token.user_pin,
    )
    store = open_keystore(settings, db)
    assert isinstance(store, HsmKeyStore)
    secret = store.generate(A.AES_128, U.MAC)
    assert (secret.backend, secret.custody) == ("pkcs11", "sealed")
    signer = store.generate(A.EC_P256, U.SIGN)
    assert (signer.backend, signer.custody) == ("pkcs11", "token")
    assert not (tmp_path / "master.key").exists()
    store.close()


def test_a_token_created_after_the_module_was_loaded_is_found_when_idle(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = Pkcs11KeyStore(softhsm_token.module, softhsm_token.label, softhsm_token.user_pin)
    key = warm.generate(A.AES_128, U.MAC)
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "late",
            "--pin",
            "1111",
            "--so-pin",
            "2222",
        ],
        check=True,
        capture_output=True,
    )
    # While a store is open the module is not re-initialised (that would end its session).
    with pytest.raises(ConfigurationError, match="late"):
        Pkcs11KeyStore(softhsm_token.module, "late", "1111")
    warm.mac(key.handle, b"still served")
    warm.close()

    late = Pkcs11KeyStore(softhsm_token.module, "late", "1111")
    assert late.list() == []
    late.close()
    monkeypatch.undo()
    back = Pkcs11KeyStore(softhsm_token.module, softhsm_token.label, softhsm_token.user_pin)
    assert back.info(key.handle).algorithm is A.AES_128
    back.destroy(key.handle)
    back.close()
