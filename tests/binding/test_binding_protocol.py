"""The constructions of docs/binding-apdu.md, recomputed from their written definition with
pyca/cryptography directly (not through trustfleet's suites), and the test vectors the
document publishes for card vendors."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustfleet.binding import protocol as p
from trustfleet.wire import tlv
from trustfleet.wire.apdu import ResponseApdu

SE_ID = bytes(range(16))

# published in docs/binding-apdu.md, "Test vectors"
VECTORS = {
    "p256": {
        "digest": "66DB3FD23665D4183B385AA4BD5907C5A4F29F46C9310A72BEC3DA67EFD3CDC7",
        "cipher": "4B3A6A94CFFAC141D46C1E5037E31DA2",
        "k_bind": "294FD07A70EF4DD512A1EB90B9B9A3A466276946EBF25175953817AF62F4B0FA",
        "confirmation": "45C6AB63D1DD3FE4C6D6337D773455E8",
        "k_crypt": "0EECA41BCDC29E0C0255AA02A25E6317",
        "s_mac": "AD232806BF098F7BCF98FDFEB508D54A",
        "s_rmac": "0DB8E062BCF410D988F7BFB64452F3C2",
        "card": "69BEC8B9A87E0FEAB7060D4DD305EDFE",
        "host": "43C410C9AFE0EEE7C7F97C9DB2197E34",
        "sm_command": "84CA00D10888645991F476AF0800",
        "sm_response": "68656C6C6F70FCC10BFD5811919000",
        "admin_key": "3687907D3D27CFD70C91283A23C57A0C",
        "admin_cryptogram": "12AB6E2278BE084BF8125BAF25C92A2B",
    },
    "gm": {
        "digest": "5CA6EDC98DB823C9C7F7C387352870774DFC3DE54F4378BB886BC425BCE2916B",
        "cipher": "F33C3DD2B38B968AE20AFCCF1EF48C03",
        "k_bind": "20DB4454496D8E6BAA0D7AF79E3118877DA51FB37DFBAF289F8C5FA1B00AA531",
        "confirmation": "775C4C4BB0C26AA430021800A3C12764",
        "k_crypt": "BA6D7162A1B5ED415510BB829E29CF1F",
        "s_mac": "F8C7471097F7B90EA4B1697474E1927E",
        "s_rmac": "42BB2C1D5D818EDA323BCA0E4542BD36",
        "card": "8372AA9A83B7A2DF39D227D63EED07F1",
        "host": "95EE6B8F3A8B6581282AA7A32E080B1E",
        "sm_command": "84CA00D108410733CA43F8A39C00",
        "sm_response": "68656C6C6FB8B422ADAFF402CE9000",
        "admin_key": "3FF394F847814E9FA880606D909A2492",
        "admin_cryptogram": "0A7DF1BA8428F0C47375F30C4EE57857",
    },
}


def _hash(suite: str) -> hashes.HashAlgorithm:
    return hashes.SM3() if suite == "gm" else hashes.SHA256()


def _hmac(suite: str, key: bytes, data: bytes) -> bytes:
    if suite == "p256":
        return hmac.new(key, data, hashlib.sha256).digest()
    mac = pyca_hmac.HMAC(key, hashes.SM3())
    mac.update(data)
    return mac.finalize()


def _cmac(suite: str, key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.SM4(key) if suite == "gm" else algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def _hkdf(suite: str, secret: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(_hash(suite), length, salt, info).derive(secret)


def _label(text: str, *fields: bytes) -> bytes:
    return b"TF-SEB-v1 " + text.encode() + b"\x00" + SE_ID + b"".join(fields)


@pytest.mark.parametrize("suite", ["p256", "gm"])
def test_the_published_vectors_follow_from_the_written_definitions(suite: str) -> None:
    v = {k: bytes.fromhex(x) for k, x in VECTORS[suite].items()}
    r1, r2 = b"\x11" * 32, b"\x22" * 32
    assert _hmac(suite, r1, _label("digest response", r2)) == v["digest"]
    assert p.digest_response(suite, r1, SE_ID, r2) == v["digest"]
    assert _cmac(suite, r1[:16], _label("cipher response", r2[:16])) == v["cipher"]
    assert p.cipher_response(suite, r1[:16], SE_ID, r2[:16]) == v["cipher"]

    pairing_public = b"\x04" + b"\x88" * 64
    secret, nonce = b"\x66" * 32, b"\x77" * 16
    k_bind = _hkdf(suite, secret, nonce, _label("mutual binding key", pairing_public), 32)
    assert k_bind == v["k_bind"] == p.binding_key(suite, secret, SE_ID, nonce, pairing_public)
    confirmation = _hmac(suite, k_bind, _label("mutual pairing confirmation", nonce))[:16]
    assert confirmation == v["confirmation"]
    assert p.pairing_confirmation(suite, k_bind, SE_ID, nonce) == v["confirmation"]

    k, hc, sc = b"\x33" * 32, b"\x44" * 16, b"\x55" * 16
    okm = _hkdf(suite, k, hc + sc, _label("mutual session keys"), 48)
    assert (okm[:16], okm[16:32], okm[32:]) == (v["k_crypt"], v["s_mac"], v["s_rmac"])
    keys = p.session_keys(suite, k, SE_ID, hc, sc)
    assert (keys.k_crypt, keys.s_mac, keys.s_rmac) == (v["k_crypt"], v["s_mac"], v["s_rmac"])
    assert _cmac(suite, v["k_crypt"], _label("card cryptogram", hc, sc)) == v["card"]
    assert _cmac(suite, v["k_crypt"], _label("host cryptogram", hc, sc)) == v["host"]
    assert p.cryptogram(suite, keys, "card", SE_ID, hc, sc) == v["card"]
    assert p.cryptogram(suite, keys, "host", SE_ID, hc, sc) == v["host"]

    # secure messaging: GET DATA D1 then its answer "hello", first exchange of a session
    c_mac = _cmac(suite, v["s_mac"], bytes(16) + bytes.fromhex("84CA00D1") + b"\x00\x08")
    assert v["sm_command"] == bytes.fromhex("84CA00D108") + c_mac[:8] + b"\x00"
    r_mac = _cmac(suite, v["s_rmac"], c_mac + b"hello" + b"\x90\x00")
    assert v["sm_response"] == b"hello" + r_mac[:8] + b"\x90\x00"
    host, card = p.SecureChannel(suite, keys), p.SecureChannel(suite, keys)
    command = host.wrap_command(p.get_data_command(p.DO_HOLDER_DATA))
    assert command.encode() == v["sm_command"]
    assert card.unwrap_command(command) is not None
    assert card.wrap_response(ResponseApdu(b"hello", 0x9000)).encode() == v["sm_response"]

    issuer = b"\x99" * 32
    admin = _hkdf(suite, issuer, None, _label("admin key"), 16)
    assert admin == v["admin_key"] == p.admin_key(suite, issuer, SE_ID)
    challenge = b"\xaa" * 16
    assert _cmac(suite, admin, _label("admin reset", challenge)) == v["admin_cryptogram"]


def test_labels_are_distinct_and_no_label_is_a_prefix_of_another() -> None:
    labels = [label + b"\x00" for label in p.LABELS.values()]
    assert len(set(labels)) == len(labels)
    for a in labels:
        for b in labels:
            assert a == b or not b.startswith(a)


def test_the_card_and_host_cryptograms_differ_for_the_same_session() -> None:
    keys = p.session_keys("p256", b"\x01" * 32, SE_ID, b"\x02" * 16, b"\x03" * 16)
    card = p.cryptogram("p256", keys, "card", SE_ID, b"\x02" * 16, b"\x03" * 16)
    host = p.cryptogram("p256", keys, "host", SE_ID, b"\x02" * 16, b"\x03" * 16)
    assert card != host  # a reflected card cryptogram is never a valid host cryptogram


def test_host_flows_are_single_use() -> None:
    cred = p.Credential(SE_ID, "h", p.Mode.DIGEST, "p256", b"\x00" * 32)
    flow = p.HostVerification(cred, random=lambda n: b"\x00" * n)
    flow.start()
    from trustfleet.binding.errors import SeMalformedMessage

    with pytest.raises(SeMalformedMessage):
        flow.start()


def test_the_select_answer_reads_alike_in_any_layout_and_is_strict() -> None:
    """The FCI as the applet lays it out (read in place), the same objects in another
    order (the full decoder), and damaged ones (refused either way)."""
    status = p.SeStatus(SE_ID, p.Lifecycle.LOCKED, p.Mode.MUTUAL, "gm", 4, 3, False)
    fci = status.encode_fci()
    assert fci == bytes.fromhex("6F248407F0746653454201C010") + SE_ID + bytes.fromhex(
        "C10701020502040300"
    )
    assert p.SeStatus.parse_fci(fci) == status
    objects = [
        (p.DO_STATUS, status.encode_status()),
        (p.TAG_AID, p.AID),
        (p.DO_SE_ID, SE_ID),
    ]
    reordered = tlv.encode(p.TAG_FCI, tlv.encode_all(objects))
    assert len(reordered) == len(fci) and reordered != fci
    assert p.SeStatus.parse_fci(reordered) == status
    damaged = [
        fci[:-1],  # short
        fci + b"\x00",  # trailing byte
        fci[:29] + b"\xc2" + fci[30:],  # the status object under another tag
        fci[:5] + b"\x00" + fci[6:],  # another AID: the full decoder takes it, status is fine
        fci[:31] + b"\x09" + fci[32:],  # status version 9
        fci[:32] + b"\x07" + fci[33:],  # unknown lifecycle
    ]
    for bad in damaged[:3] + damaged[4:]:
        with pytest.raises(p.SeMalformedMessage):
            p.SeStatus.parse_fci(bad)
    assert p.SeStatus.parse_fci(damaged[3]) == status
