"""The host side end to end in process: every mode with every suite, a stolen SE in another
host, the encrypted credential store, recovery after crashes, and what the bus reveals."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustfleet.binding import protocol as p
from trustfleet.binding.errors import (
    SeBoundElsewhere,
    SeCardCryptogramInvalid,
    SeHostStoreUnreadable,
    SeNotVerified,
    SeVerificationFailed,
)
from trustfleet.binding.host import EventKind, Host, HostKey, HostStore
from trustfleet.binding.protocol import Credential, Lifecycle, Mode
from trustfleet.binding.secure_element import MAX_VERIFY_TRIES
from trustfleet.crypto import get_suite
from trustfleet.wire.apdu import ResponseApdu

from .conftest import MODES, SUITES, HostFactory, RecordingTransport, bus, make_se


def _service_key(host: Host, suite: str) -> object:
    raw = host.service_public_key()
    return p.load_public_key_bytes(suite, raw)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mode", MODES)
def test_bound_host_verifies_after_power_cycles_and_a_stolen_se_refuses_everything(
    make_host: HostFactory, mode: Mode, suite: str
) -> None:
    se = make_se(suite)
    owner = make_host(se, mode=mode, suite=suite, device_id="owner")
    first = owner.power_up()
    assert first.bound_now and (first.mode, first.suite) == (mode, suite)
    assert se.status().lifecycle is Lifecycle.LOCKED
    for _ in range(3):
        again = owner.power_up()
        assert not again.bound_now
        assert owner.holder_data() == b"subscriber 42"
        signature = owner.sign(b"meter reading 1234")
        get_suite(suite).verify(_service_key(owner, suite), b"meter reading 1234", signature)  # type: ignore[arg-type]

    thief = make_host(se, mode=mode, suite=suite, device_id="thief")
    with pytest.raises(SeBoundElsewhere):
        thief.power_up()
    with pytest.raises(SeNotVerified):
        thief.sign(b"anything")
    with pytest.raises(SeNotVerified):
        thief.holder_data()
    # the thief forges a credential of the right shape and tries it
    forged = _forged_credential(se.se_id, mode, suite)
    if mode is Mode.MUTUAL:
        with pytest.raises(SeCardCryptogramInvalid):  # the host library stops at once
            thief.verify(forged)
        _send_forged_host_cryptogram(thief)  # a hand-made attack goes on anyway
    else:
        with pytest.raises(SeVerificationFailed) as failed:
            thief.verify(forged)
        assert failed.value.tries_left == MAX_VERIFY_TRIES - 1
    with pytest.raises(SeNotVerified):
        thief.sign(b"anything")
    # back in its own host, the SE works again and its counter is restored
    owner.power_up()
    assert owner.holder_data() == b"subscriber 42"
    assert se.status().tries_left == MAX_VERIFY_TRIES


def _send_forged_host_cryptogram(thief: Host) -> None:
    initialize = p.CommandApdu(p.CLA_PROPRIETARY, p.INS_INITIALIZE, 0, 0, b"\x00" * 16, 256)
    assert ResponseApdu.parse(thief.transport.transmit(initialize.encode())).ok
    forged = p.CommandApdu(p.CLA_ISO, p.INS_EXTERNAL_AUTHENTICATE, 0, 0, b"\x00" * 16)
    answer = ResponseApdu.parse(thief.transport.transmit(forged.encode()))
    assert answer.sw == 0x63C0 | (MAX_VERIFY_TRIES - 1)


def _forged_credential(se_id: bytes, mode: Mode, suite: str) -> Credential:
    secret = {
        Mode.DIGEST: b"\x00" * 32,
        Mode.CIPHER: b"\x00" * 16,
        Mode.MUTUAL: b"\x00" * 32,
    }.get(mode)
    if secret is None:  # asymmetric: some public key; signature: the thief's own key
        key = p.generate_key(suite)
        secret = (
            p.public_key_bytes(key.public_key())
            if mode is Mode.ASYMMETRIC
            else p.private_key_bytes(key)
        )
    return Credential(se_id, "thief", mode, suite, secret)


def test_mutual_host_rejects_an_se_whose_cryptogram_is_wrong(make_host: HostFactory) -> None:
    """The other direction: a swapped SE (or a forged answer on the bus) is caught by the
    host before it sends its own cryptogram."""
    se = make_se()
    owner = make_host(se, mode=Mode.MUTUAL)
    owner.power_up()

    def forge_card_cryptogram(response: bytes) -> bytes:
        if len(response) == 34:  # Sc || card cryptogram || 9000
            return response[:16] + bytes(16) + response[-2:]
        return response

    bus(owner).tamper_response = forge_card_cryptogram
    with pytest.raises(SeCardCryptogramInvalid):
        owner.power_up()
    assert not [c for c, _ in bus(owner).exchanges[-1:] if c[1] == 0x82]  # no host cryptogram
    bus(owner).tamper_response = None
    owner.power_up()


@pytest.mark.parametrize("mode", [Mode.DIGEST, Mode.CIPHER])
def test_r1_supplied_by_the_host_binds_too(make_host: HostFactory, mode: Mode) -> None:
    se = make_se()
    host = make_host(se, mode=mode, r1_from_host=True)
    host.power_up()
    register = next(c for c, _ in bus(host).exchanges if c[1] == p.INS_REGISTER)
    stored = host.store.credential(se.se_id)
    assert stored is not None and stored.secret in register  # host -> SE direction
    register_answer = next(r for c, r in bus(host).exchanges if c[1] == p.INS_REGISTER)
    assert register_answer == bytes.fromhex("9000")
    host.power_up()


def test_what_an_eavesdropper_on_the_bus_learns_per_mode(make_host: HostFactory) -> None:
    """digest/cipher as written send R1 across the bus once, at registration; mutual mode
    never lets the binding key (or anything equal to it) cross."""
    digest_se, mutual_se = make_se(), make_se()
    digest_host = make_host(digest_se, mode=Mode.DIGEST)
    mutual_host = make_host(mutual_se, mode=Mode.MUTUAL)
    for host in (digest_host, mutual_host):
        for _ in range(3):
            host.power_up()
        host.holder_data()
    r1 = digest_host.store.credential(digest_se.se_id).secret  # type: ignore[union-attr]
    k_bind = mutual_host.store.credential(mutual_se.se_id).secret  # type: ignore[union-attr]
    assert r1 in bus(digest_host).bus_bytes()
    assert k_bind not in bus(mutual_host).bus_bytes()
    assert b"subscriber 42" in bus(mutual_host).bus_bytes()  # MACed, not encrypted


def test_events_are_reported_with_device_and_se_ids(make_host: HostFactory) -> None:
    se = make_se()
    owner = make_host(se, mode=Mode.CIPHER, device_id="gateway-7")
    owner.power_up()
    owner.power_up()
    thief = make_host(se, mode=Mode.CIPHER, device_id="thief-1")
    with pytest.raises(SeBoundElsewhere):
        thief.power_up()
    kinds = [(e.kind, e.device_id) for e in make_host.events]
    assert kinds == [
        (EventKind.BOUND, "gateway-7"),
        (EventKind.VERIFIED, "gateway-7"),
        (EventKind.LOCKED, "gateway-7"),
        (EventKind.VERIFIED, "gateway-7"),
        (EventKind.FAILED, "thief-1"),
    ]
    assert {e.se_id for e in make_host.events} == {se.se_id}
    forged = Credential(se.se_id, "thief-1", Mode.CIPHER, "p256", b"\x00" * 16)
    for _ in range(MAX_VERIFY_TRIES):
        with pytest.raises(SeVerificationFailed):
            thief.verify(forged)
    assert make_host.events[-1].kind is EventKind.BLOCKED


def test_the_credential_store_is_encrypted_and_bound_to_the_host_key(
    make_host: HostFactory, tmp_path: Path
) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.DIGEST, store_path=tmp_path / "h.store")
    host.power_up()
    r1 = host.store.credential(se.se_id).secret  # type: ignore[union-attr]
    raw = (tmp_path / "h.store").read_bytes()
    import base64

    for form in (r1, r1.hex().encode(), base64.b64encode(r1)):
        assert form not in raw
    assert (tmp_path / "h.store").stat().st_mode & 0o077 == 0
    with pytest.raises(SeHostStoreUnreadable):
        HostStore(tmp_path / "h.store", HostKey(b"\x01" * 32))
    reopened = HostStore(tmp_path / "h.store", HostKey.from_file(tmp_path / "h.key"))
    assert reopened.credential(se.se_id) == host.store.credential(se.se_id)


def test_host_crash_before_storing_the_credential_rebinds_at_next_power_up(
    make_host: HostFactory, tmp_path: Path
) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL, store_path=tmp_path / "h.store")

    def crash(credential: Credential) -> None:
        raise OSError("power lost while writing the host store")

    host.store.put = crash  # type: ignore[method-assign]
    with pytest.raises(OSError):
        host.power_up()
    assert se.status().lifecycle is Lifecycle.REGISTERED  # the SE registered; host has nothing
    rebooted = make_host(se, mode=Mode.MUTUAL, store_path=tmp_path / "h.store")
    assert rebooted.power_up().bound_now
    assert se.status().lifecycle is Lifecycle.LOCKED


def test_host_crash_between_store_and_lock_locks_at_next_power_up(
    make_host: HostFactory, tmp_path: Path
) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.DIGEST, store_path=tmp_path / "h.store")
    host.lock = lambda: (_ for _ in ()).throw(OSError("power lost"))  # type: ignore[method-assign]
    with pytest.raises(OSError):
        host.power_up()
    assert se.status().lifecycle is Lifecycle.REGISTERED
    rebooted = make_host(se, mode=Mode.DIGEST, store_path=tmp_path / "h.store")
    result = rebooted.power_up()
    assert not result.bound_now  # same credential, verified, then locked
    assert se.status().lifecycle is Lifecycle.LOCKED


def test_mutual_power_up_takes_three_apdu_exchanges(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL)
    host.power_up()
    assert host.power_up().apdus == 3  # SELECT, INITIALIZE, EXTERNAL AUTHENTICATE


def test_a_se_answering_garbage_is_a_typed_error(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.DIGEST)
    host.power_up()
    assert isinstance(host.transport, RecordingTransport)
    host.transport.tamper_response = lambda r: ResponseApdu(b"\x01\x02", 0x9000).encode()
    from trustfleet.binding.errors import SeMalformedMessage

    with pytest.raises(SeMalformedMessage):
        host.power_up()


def test_public_keys_off_the_curve_are_refused() -> None:
    from trustfleet.binding.errors import SeMalformedMessage

    for suite in SUITES:
        with pytest.raises(SeMalformedMessage):
            p.load_public_key_bytes(suite, b"\x04" + b"\x01" * 64)


def test_a_host_whose_se_was_reset_and_bound_elsewhere_refuses_it(make_host: HostFactory) -> None:
    from .conftest import ISSUER_KEY

    se = make_se()
    first = make_host(se, mode=Mode.CIPHER)
    first.power_up()
    second = make_host(se, mode=Mode.MUTUAL)
    second.transport.power_cycle()
    second.admin_reset(issuer_key=ISSUER_KEY, issuer_suite="p256")
    second.power_up()
    with pytest.raises(SeBoundElsewhere):  # its stale cipher credential is not even tried
        first.power_up()
    assert se.status().tries_left == MAX_VERIFY_TRIES
