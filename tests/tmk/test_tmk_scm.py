"""The terminal's secure control module: keys made inside, kept encrypted on disk, used but
never handed out."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from trustfleet.crypto import (
    algorithm_of,
    load_public_key,
    private_key_to_der,
    public_key_to_der,
    suite_for_algorithm,
)
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.kcv import kcv as reference_kcv
from trustfleet.crypto.payment.kcv import kcv_aes_cmac
from trustfleet.tmk import errors
from trustfleet.tmk.protocol import confirmation_data, terminal_auth_tbs, transport_info
from trustfleet.tmk.scm import DeviceKey, SecureControlModule, TerminalRecord

SN = "POS-4711"
SESSION = "0123456789abcdef0123456789abcdef"
RND1 = bytes(range(32))
RND2 = bytes(range(32, 64))
AES_TMK = bytes.fromhex("00112233445566778899aabbccddeeff")
TDES_TMK = bytes.fromhex("0123456789abcdeffedcba987654321089abcdef01234567")

ALGORITHMS = [
    pytest.param(KeyAlgorithm.EC_P256, id="p256"),
    pytest.param(KeyAlgorithm.RSA_2048, id="rsa-2048"),
    pytest.param(KeyAlgorithm.SM2, id="sm2"),
    pytest.param(KeyAlgorithm.ED25519, id="ed25519"),
]


@pytest.fixture
def device_key(tmp_path: Path) -> DeviceKey:
    return DeviceKey.generate_file(tmp_path / "device.key")


@pytest.fixture
def make_scm(tmp_path: Path, device_key: DeviceKey) -> Callable[..., SecureControlModule]:
    def make(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> SecureControlModule:
        path = tmp_path / f"scm-{algorithm.value}.json"
        SecureControlModule.factory(path, SN, algorithm, device_key=device_key)
        return SecureControlModule.open(path, device_key)

    return make


@pytest.fixture
def scm(make_scm: Callable[..., SecureControlModule]) -> SecureControlModule:
    return make_scm()


def deliver(
    scm: SecureControlModule,
    tmk: bytes = AES_TMK,
    algorithm: KeyAlgorithm = KeyAlgorithm.AES_128,
    *,
    session_id: str = SESSION,
    kcv: bytes | None = None,
) -> dict[str, Any]:
    """What the key server sends: the TMK transported to the SCM's key, bound to the session."""
    suite = suite_for_algorithm(scm.algorithm)
    info = transport_info(
        suite, sn=scm.sn, session_id=session_id, rnd1=RND1, rnd2=RND2, algorithm=algorithm
    )
    kem_suite = suite_for_algorithm(algorithm_of(scm.kem_public_key))
    return {
        "session_id": session_id,
        "rnd1": RND1,
        "rnd2": RND2,
        "algorithm": algorithm,
        "wrapped_tmk": kem_suite.kem_wrap(scm.kem_public_key, tmk, info),
        "kcv": reference_kcv(algorithm, tmk) if kcv is None else kcv,
    }


def aes_cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def secrets_of(scm: SecureControlModule) -> list[bytes]:
    """White box: the SCM's private material, read only to search for it elsewhere."""
    found = [private_key_to_der(scm._tkp)]
    if scm._kem_key is not None:
        found.append(private_key_to_der(scm._kem_key))
    if scm._tmk is not None:
        found.append(scm._tmk.key)
    return found


def assert_absent(secret: bytes, blob: bytes) -> None:
    assert secret not in blob
    assert secret.hex().encode() not in blob
    assert base64.b64encode(secret) not in blob


# =====================================================================================
# Factory and record
# =====================================================================================


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_factory_makes_the_tkp_inside_and_exports_only_the_public_record(
    tmp_path: Path, device_key: DeviceKey, algorithm: KeyAlgorithm
) -> None:
    path = tmp_path / "scm.json"
    record = SecureControlModule.factory(
        path, SN, algorithm, device_key=device_key, model="TF-POS-9"
    )
    scm = SecureControlModule.open(path, device_key)

    assert isinstance(record, TerminalRecord)
    assert (record.sn, record.model, record.algorithm) == (SN, "TF-POS-9", algorithm)
    public = load_public_key(record.public_key_pem.encode())
    assert public_key_to_der(public) == public_key_to_der(scm.public_key)
    assert record == scm.record()
    if algorithm is KeyAlgorithm.ED25519:  # Ed25519 cannot receive keys: it gets an X25519 key
        assert record.kem_algorithm is KeyAlgorithm.X25519
        assert record.kem_public_key_pem is not None
        kem = load_public_key(record.kem_public_key_pem.encode())
        assert public_key_to_der(kem) == public_key_to_der(scm.kem_public_key)
    else:
        assert record.kem_public_key_pem is None
        assert public_key_to_der(scm.kem_public_key) == public_key_to_der(scm.public_key)
    exported = json.dumps(record.to_dict())
    for secret in secrets_of(scm):
        assert_absent(secret, exported.encode())
    assert record.to_dict()["public_key"] == record.public_key_pem


def test_two_terminals_get_different_keys(tmp_path: Path, device_key: DeviceKey) -> None:
    a = SecureControlModule.factory(tmp_path / "a", SN, KeyAlgorithm.EC_P256, device_key=device_key)
    b = SecureControlModule.factory(tmp_path / "b", SN, KeyAlgorithm.EC_P256, device_key=device_key)
    assert a.public_key_pem != b.public_key_pem


def test_factory_refuses_to_overwrite_an_existing_module(
    tmp_path: Path, device_key: DeviceKey
) -> None:
    path = tmp_path / "scm.json"
    SecureControlModule.factory(path, SN, KeyAlgorithm.EC_P256, device_key=device_key)
    before = path.read_bytes()
    with pytest.raises(errors.ScmExists):
        SecureControlModule.factory(path, SN, KeyAlgorithm.EC_P256, device_key=device_key)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.X25519, KeyAlgorithm.AES_128, KeyAlgorithm.HMAC_SHA256]
)
def test_factory_refuses_keys_that_cannot_authenticate_a_terminal(
    tmp_path: Path, device_key: DeviceKey, algorithm: KeyAlgorithm
) -> None:
    with pytest.raises(errors.TmkUnsupportedSuite):
        SecureControlModule.factory(tmp_path / "scm", SN, algorithm, device_key=device_key)
    assert not (tmp_path / "scm").exists()


@pytest.mark.parametrize("sn", ["", "has space", "x" * 65, "../../etc/passwd", "-lead"])
def test_factory_refuses_an_invalid_sn(tmp_path: Path, device_key: DeviceKey, sn: str) -> None:
    with pytest.raises(errors.TmkMalformedMessage):
        SecureControlModule.factory(
            tmp_path / "scm", sn, KeyAlgorithm.EC_P256, device_key=device_key
        )


# =====================================================================================
# Storage: encrypted, authenticated, atomic
# =====================================================================================


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_private_or_secret_material_is_on_disk_in_clear(
    make_scm: Callable[..., SecureControlModule], tmp_path: Path, algorithm: KeyAlgorithm
) -> None:
    scm = make_scm(algorithm)
    scm.install_tmk(**deliver(scm))
    blob = (tmp_path / f"scm-{algorithm.value}.json").read_bytes()
    secrets = secrets_of(scm)
    assert AES_TMK in secrets
    for secret in secrets:
        assert_absent(secret, blob)
    assert json.loads(blob)["format"] == "trustfleet-scm-v1"


def test_the_file_is_private_and_every_write_uses_a_fresh_nonce(
    scm: SecureControlModule, tmp_path: Path
) -> None:
    path = tmp_path / "scm-ec-p256.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    nonces = {json.loads(path.read_bytes())["nonce"]}
    for _ in range(3):
        scm.install_tmk(**deliver(scm))
        nonces.add(json.loads(path.read_bytes())["nonce"])
    assert len(nonces) == 4
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_the_tmk_survives_a_restart(
    scm: SecureControlModule, tmp_path: Path, device_key: DeviceKey
) -> None:
    scm.install_tmk(**deliver(scm))
    reopened = SecureControlModule.open(tmp_path / "scm-ec-p256.json", device_key)
    assert reopened.has_tmk
    assert reopened.tmk_kcv == scm.tmk_kcv
    assert reopened.tmk_cmac(b"x") == aes_cmac(AES_TMK, b"x")


def test_a_wrong_device_key_cannot_open_the_module(
    scm: SecureControlModule, tmp_path: Path
) -> None:
    other = DeviceKey.generate_file(tmp_path / "other.key")
    with pytest.raises(errors.ScmUnreadable) as caught:
        SecureControlModule.open(tmp_path / "scm-ec-p256.json", other)
    assert caught.value.code == "tmk-scm-unreadable"
    with pytest.raises(errors.ScmUnreadable):  # a passphrase where a key file was used
        SecureControlModule.open(tmp_path / "scm-ec-p256.json", DeviceKey.from_passphrase("x"))


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    envelope = json.loads(path.read_bytes())
    change(envelope)
    path.write_text(json.dumps(envelope))


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda e: e.update(ciphertext=_flip_b64(e["ciphertext"])), id="ciphertext"),
        pytest.param(lambda e: e.update(nonce=_flip_b64(e["nonce"])), id="nonce"),
        pytest.param(lambda e: e.update(nonce="AAAA"), id="short-nonce"),
        pytest.param(lambda e: e.update(format="other"), id="format"),
        pytest.param(lambda e: e.update(kdf={"name": "none"}), id="kdf-name"),
        pytest.param(lambda e: e.pop("ciphertext"), id="missing-ciphertext"),
        pytest.param(lambda e: e.update(ciphertext=12), id="ciphertext-number"),
    ],
)
def test_a_tampered_file_is_refused(
    scm: SecureControlModule, tmp_path: Path, device_key: DeviceKey, change: Callable[..., None]
) -> None:
    path = tmp_path / "scm-ec-p256.json"
    _edit(path, change)
    with pytest.raises(errors.ScmUnreadable):
        SecureControlModule.open(path, device_key)


@pytest.mark.parametrize("content", [b"", b"garbage", b"[]", b"{}", b"\xff" * 10])
def test_a_corrupt_or_missing_file_is_refused(
    tmp_path: Path, device_key: DeviceKey, content: bytes
) -> None:
    path = tmp_path / "scm.json"
    with pytest.raises(errors.ScmUnreadable):
        SecureControlModule.open(path, device_key)
    path.write_bytes(content)
    with pytest.raises(errors.ScmUnreadable):
        SecureControlModule.open(path, device_key)


def test_a_passphrase_protected_module(tmp_path: Path) -> None:
    path = tmp_path / "scm.json"
    key = DeviceKey.from_passphrase("correct horse", scrypt_n=2**10)
    SecureControlModule.factory(path, SN, KeyAlgorithm.EC_P256, device_key=key)
    kdf = json.loads(path.read_bytes())["kdf"]
    assert (
        kdf["name"] == "scrypt" and kdf["n"] == 2**10 and len(base64.b64decode(kdf["salt"])) == 16
    )

    scm = SecureControlModule.open(path, DeviceKey.from_passphrase("correct horse"))
    scm.install_tmk(**deliver(scm))
    assert SecureControlModule.open(path, DeviceKey.from_passphrase("correct horse")).has_tmk
    with pytest.raises(errors.ScmUnreadable):
        SecureControlModule.open(path, DeviceKey.from_passphrase("wrong horse"))


def test_weakened_scrypt_parameters_in_the_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "scm.json"
    key = DeviceKey.from_passphrase("pw", scrypt_n=2**10)
    SecureControlModule.factory(path, SN, KeyAlgorithm.EC_P256, device_key=key)
    envelope = json.loads(path.read_bytes())
    # a lower cost (weaker) and a cost so high that deriving would exhaust memory
    for n in (2, 2**9, 2**30, "many"):
        _edit(path, lambda e, n=n: e["kdf"].update(n=n))  # type: ignore[misc]
        with pytest.raises(errors.ScmUnreadable):
            SecureControlModule.open(path, key)
    path.write_text(json.dumps(envelope))
    assert SecureControlModule.open(path, key).sn == SN


def test_device_key_files(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    DeviceKey.generate_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    with pytest.raises(errors.ScmExists):
        DeviceKey.generate_file(path)
    short = tmp_path / "short.key"
    short.write_bytes(os.urandom(16))
    with pytest.raises(errors.ScmUnreadable):
        DeviceKey.from_file(short)
    with pytest.raises(errors.ScmUnreadable):
        DeviceKey.from_file(tmp_path / "missing.key")
    with pytest.raises(errors.ScmError):
        DeviceKey.from_passphrase("")
    key = DeviceKey.from_file(path)
    assert path.read_bytes().hex() not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)


# =====================================================================================
# Use without export
# =====================================================================================


def test_nothing_the_module_offers_returns_secret_material(scm: SecureControlModule) -> None:
    scm.install_tmk(**deliver(scm))
    secrets = secrets_of(scm)
    public_names = [name for name in dir(scm) if not name.startswith("_")]
    for name in public_names:
        value = getattr(scm, name)
        if callable(value):
            continue
        text = repr(value).encode()
        for secret in secrets:
            assert_absent(secret, text)
            assert value != secret
    for secret in secrets:
        assert_absent(secret, repr(scm).encode())
        assert_absent(secret, json.dumps(scm.record().to_dict()).encode())
    assert not any("export" in name or "private" in name for name in public_names)
    with pytest.raises(TypeError):
        pickle.dumps(scm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_tkp_signs_terminal_proofs_only(
    make_scm: Callable[..., SecureControlModule], algorithm: KeyAlgorithm
) -> None:
    scm = make_scm(algorithm)
    signature = scm.sign_terminal_proof(session_id=SESSION, rnd1=RND1, rnd2=RND2)
    suite = suite_for_algorithm(algorithm)
    tbs = terminal_auth_tbs(sn=SN, suite=scm.suite, session_id=SESSION, rnd1=RND1, rnd2=RND2)
    suite.verify(scm.public_key, tbs, signature)
    # the signed bytes are always a domain-separated TMK-download transcript, so the
    # module cannot be made to sign a chosen message
    assert tbs.startswith(len(b"TF-TMK-v1 terminal-auth").to_bytes(4, "big"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_install_unwraps_checks_and_stores_the_tmk(
    make_scm: Callable[..., SecureControlModule], algorithm: KeyAlgorithm
) -> None:
    scm = make_scm(algorithm)
    assert not scm.has_tmk
    scm.install_tmk(**deliver(scm))
    assert scm.has_tmk
    assert scm.tmk_algorithm is KeyAlgorithm.AES_128
    assert scm.tmk_kcv == reference_kcv(KeyAlgorithm.AES_128, AES_TMK)
    assert scm.tmk_cmac(b"data") == aes_cmac(AES_TMK, b"data")
    assert scm.tmk_cmac_verify(b"data", aes_cmac(AES_TMK, b"data"))
    assert not scm.tmk_cmac_verify(b"data", aes_cmac(AES_TMK, b"other"))


def test_a_tdes_tmk_macs_with_tdes_cmac(scm: SecureControlModule) -> None:
    scm.install_tmk(**deliver(scm, TDES_TMK, KeyAlgorithm.TDES))
    mac = cmac.CMAC(TripleDES(TDES_TMK))
    mac.update(b"data")
    assert scm.tmk_cmac(b"data") == mac.finalize()
    assert len(scm.tmk_kcv) == 3


def test_aes_256_tmk(scm: SecureControlModule) -> None:
    key = bytes(range(32))
    scm.install_tmk(**deliver(scm, key, KeyAlgorithm.AES_256))
    assert scm.tmk_cmac(b"z") == aes_cmac(key, b"z")


def test_a_kcv_mismatch_stores_nothing(
    scm: SecureControlModule, tmp_path: Path, device_key: DeviceKey
) -> None:
    delivery = deliver(scm)
    delivery["kcv"] = reference_kcv(KeyAlgorithm.AES_128, bytes(16))
    with pytest.raises(errors.TmkKcvMismatch):
        scm.install_tmk(**delivery)
    assert not scm.has_tmk
    assert not SecureControlModule.open(tmp_path / "scm-ec-p256.json", device_key).has_tmk


def test_a_failed_install_keeps_the_previous_tmk(scm: SecureControlModule) -> None:
    scm.install_tmk(**deliver(scm))
    bad = deliver(scm, bytes(16))
    bad["wrapped_tmk"] = bad["wrapped_tmk"][:-1] + bytes([bad["wrapped_tmk"][-1] ^ 1])
    with pytest.raises(errors.TmkUnwrapFailed):
        scm.install_tmk(**bad)
    assert scm.tmk_cmac(b"x") == aes_cmac(AES_TMK, b"x")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"session_id": "f" * 32}, id="other-session"),
        pytest.param({"rnd1": bytes(32)}, id="other-rnd1"),
        pytest.param({"rnd2": bytes(32)}, id="other-rnd2"),
    ],
)
def test_a_delivery_bound_to_another_transcript_does_not_unwrap(
    scm: SecureControlModule, change: dict[str, Any]
) -> None:
    with pytest.raises(errors.TmkUnwrapFailed):
        scm.install_tmk(**{**deliver(scm), **change})
    assert not scm.has_tmk


def test_a_delivery_for_another_terminal_does_not_unwrap(
    make_scm: Callable[..., SecureControlModule], tmp_path: Path, device_key: DeviceKey
) -> None:
    scm = make_scm()
    SecureControlModule.factory(tmp_path / "other", SN, KeyAlgorithm.EC_P256, device_key=device_key)
    other = SecureControlModule.open(tmp_path / "other", device_key)
    with pytest.raises(errors.TmkUnwrapFailed):
        scm.install_tmk(**deliver(other))


def test_a_key_of_the_wrong_length_is_refused(scm: SecureControlModule) -> None:
    # a 24-byte key labelled AES-128, with the KCV the 24-byte key really has
    delivery = deliver(scm, bytes(range(24)), kcv=kcv_aes_cmac(bytes(range(24))))
    with pytest.raises(errors.TmkUnwrapFailed):
        scm.install_tmk(**delivery)


def test_the_confirmation_mac_is_for_the_installed_tmk_and_session_only(
    scm: SecureControlModule,
) -> None:
    with pytest.raises(errors.ScmNoTmk):
        scm.confirmation_mac(session_id=SESSION, kcv=bytes(5))
    with pytest.raises(errors.ScmNoTmk):
        scm.tmk_cmac(b"x")
    scm.install_tmk(**deliver(scm))
    kcv = scm.tmk_kcv
    expected = aes_cmac(AES_TMK, confirmation_data(session_id=SESSION, kcv=kcv))
    assert scm.confirmation_mac(session_id=SESSION, kcv=kcv) == expected
    with pytest.raises(errors.ScmNoTmk):
        scm.confirmation_mac(session_id="e" * 32, kcv=kcv)
    with pytest.raises(errors.ScmNoTmk):
        scm.confirmation_mac(session_id=SESSION, kcv=bytes(5))


def test_a_failed_write_keeps_the_previous_tmk(
    scm: SecureControlModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    scm.install_tmk(**deliver(scm))

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(errors.ScmError) as caught:
        scm.install_tmk(**deliver(scm, bytes(range(16)), session_id="c" * 32))
    assert caught.value.code == "tmk-scm-error"
    assert scm.tmk_cmac(b"x") == aes_cmac(AES_TMK, b"x")


def test_a_new_download_replaces_the_tmk(scm: SecureControlModule) -> None:
    scm.install_tmk(**deliver(scm))
    second = bytes(range(100, 116))
    scm.install_tmk(**deliver(scm, second, session_id="b" * 32))
    assert scm.tmk_cmac(b"x") == aes_cmac(second, b"x")
