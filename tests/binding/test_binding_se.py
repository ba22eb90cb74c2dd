"""The applet's own rules, over raw APDUs: status words, lock, replay, brute force, the
authorised reset, secure messaging and power cuts at every NV write step."""

from __future__ import annotations

import pytest

from trustfleet.binding import protocol as p
from trustfleet.binding.errors import (
    SeAlreadyLocked,
    SeBlocked,
    SeNotVerified,
    SeRefused,
    SeSecureMessagingFailed,
    SeVerificationFailed,
)
from trustfleet.binding.protocol import Lifecycle, Mode
from trustfleet.binding.secure_element import MAX_ADMIN_TRIES, MAX_VERIFY_TRIES, SecureElement
from trustfleet.binding.storage import FileNvStore, MemoryNvStore, PowerCut
from trustfleet.wire.apdu import SW, CommandApdu, ResponseApdu

from .conftest import ISSUER_KEY, MODES, SUITES, HostFactory, bus, make_se


def send(se: SecureElement, cmd: CommandApdu) -> ResponseApdu:
    return ResponseApdu.parse(se.transmit(cmd.encode()))


def powered_and_selected(se: SecureElement) -> None:
    se.reset()
    assert send(se, p.select_command()).sw == SW.OK


SIGN = p.sign_command(b"pay 10.00")
HOLDER = p.get_data_command(p.DO_HOLDER_DATA)


def test_select_by_aid_and_unknown_aid() -> None:
    se = make_se()
    se.power_on()
    assert send(se, p.get_data_command(p.DO_SE_ID)).sw == SW.INS_NOT_SUPPORTED  # not selected
    assert send(se, CommandApdu(0, 0xA4, 4, 0, b"\xa0\x00\x00\x00\x03", 256)).sw == 0x6A82
    answer = send(se, p.select_command())
    status = p.SeStatus.parse_fci(answer.data)
    assert status.se_id == se.se_id and status.lifecycle is Lifecycle.BLANK
    assert (status.tries_left, status.admin_tries_left) == (MAX_VERIFY_TRIES, MAX_ADMIN_TRIES)
    assert send(se, p.get_data_command(p.DO_SE_ID)).data == se.se_id
    assert send(se, CommandApdu(0x00, 0x99, 0, 0)).sw == SW.INS_NOT_SUPPORTED
    assert send(se, CommandApdu(0x90, 0x10, 0, 0)).sw == SW.CLA_NOT_SUPPORTED
    assert ResponseApdu.parse(se.transmit(b"\x00\xa4")).sw == SW.WRONG_LENGTH


@pytest.mark.parametrize("mode", MODES)
def test_services_answer_6982_until_verified_in_this_power_cycle(
    make_host: HostFactory, mode: Mode
) -> None:
    se = make_se()
    host = make_host(se, mode=mode)
    host.power_up()
    powered_and_selected(se)  # power cycle: the verification is gone
    assert send(se, SIGN).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert send(se, HOLDER).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert send(se, p.lock_command()).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert send(se, p.get_data_command(p.DO_SE_ID)).sw == SW.OK  # public objects stay public
    host.power_up()
    assert host.holder_data() == b"subscriber 42"


def test_blank_se_refuses_services_and_verification() -> None:
    se = make_se()
    powered_and_selected(se)
    assert send(se, SIGN).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    get_challenge = CommandApdu(0, p.INS_GET_CHALLENGE, 0, 0, le=256)
    assert send(se, get_challenge).sw == SW.CONDITIONS_NOT_SATISFIED
    assert send(se, CommandApdu(0, p.INS_EXTERNAL_AUTHENTICATE, 0, 0, b"\x00" * 32)).sw == 0x6985


@pytest.mark.parametrize("mode", [Mode.DIGEST, Mode.MUTUAL])
def test_rebinding_works_before_lock_and_answers_6985_after(
    make_host: HostFactory, mode: Mode
) -> None:
    se = make_se()
    host = make_host(se, mode=mode)
    registration = p.HostRegistration(
        se_id=se.se_id, device_id="factory", mode=mode, suite="p256", random=lambda n: b"\x07" * n
    )
    powered_and_selected(se)
    first = send(se, registration.start())
    assert first.sw == SW.OK  # registered, not locked
    again = p.HostRegistration(
        se_id=se.se_id,
        device_id="factory",
        mode=Mode.CIPHER,
        suite="gm",
        random=lambda n: b"\x01" * n,
    )
    assert send(se, again.start()).sw == SW.OK  # factory retry: allowed before lock
    assert se.status().mode is Mode.CIPHER
    host.power_up()  # binds (unknown registered SE) and locks
    assert se.status().lifecycle is Lifecycle.LOCKED
    powered_and_selected(se)
    assert send(se, again.start()).sw == SW.CONDITIONS_NOT_SATISFIED
    with pytest.raises(SeAlreadyLocked):
        p.raise_for_status(send(se, again.start()), "register")
    host.power_up()  # the bound host is unaffected


@pytest.mark.parametrize("mode", [m for m in MODES if m is not Mode.MUTUAL])
def test_a_replayed_response_to_an_old_challenge_fails(make_host: HostFactory, mode: Mode) -> None:
    se = make_se()
    host = make_host(se, mode=mode)
    host.power_up()
    host.power_up()
    old_response = next(
        c for c, _ in reversed(bus(host).exchanges) if c[1] == p.INS_EXTERNAL_AUTHENTICATE
    )
    powered_and_selected(se)
    send(se, CommandApdu(0, p.INS_GET_CHALLENGE, 0, 0, le=256))  # a fresh challenge
    answer = ResponseApdu.parse(se.transmit(old_response))
    assert answer.sw == 0x63C0 | (MAX_VERIFY_TRIES - 1)
    assert send(se, SIGN).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    # and the same response cannot be played twice against one challenge either
    assert ResponseApdu.parse(se.transmit(old_response)).sw == SW.CONDITIONS_NOT_SATISFIED


def test_a_replayed_mutual_session_fails(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL)
    host.power_up()
    host.power_up()
    recorded = bus(host).exchanges[-3:]  # SELECT, INITIALIZE, EXTERNAL AUTHENTICATE
    assert [c[1] for c, _ in recorded] == [p.INS_SELECT, p.INS_INITIALIZE, 0x82]
    se.reset()
    answers = [ResponseApdu.parse(se.transmit(c)) for c, _ in recorded]
    assert answers[1].data != recorded[1][1][:-2]  # the SE picked a new challenge
    assert answers[2].sw == 0x63C0 | (MAX_VERIFY_TRIES - 1)


@pytest.mark.parametrize("suite", SUITES)
def test_brute_force_reaches_6983_and_only_the_issuer_reset_recovers(
    make_host: HostFactory, suite: str
) -> None:
    se = make_se(suite)
    owner = make_host(se, mode=Mode.CIPHER, suite=suite)
    owner.power_up()
    powered_and_selected(se)
    seen = []
    for _ in range(MAX_VERIFY_TRIES + 2):
        send(se, CommandApdu(0, p.INS_GET_CHALLENGE, 0, 0, le=256))
        seen.append(send(se, CommandApdu(0, 0x82, 0, 0, b"\x00" * 16)).sw)
    assert seen == [0x63C4, 0x63C3, 0x63C2, 0x63C1, 0x63C0, 0x6983, 0x6983]
    assert send(se, SIGN).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    with pytest.raises(SeBlocked):
        owner.power_up()  # blocked for its own host too, across power cycles
    # the issuer's authorised reset (per-SE key diversified from its master key)
    owner.transport.power_cycle()
    owner.admin_reset(issuer_key=ISSUER_KEY, issuer_suite=suite)
    assert se.status().lifecycle is Lifecycle.BLANK
    assert owner.power_up().bound_now
    assert se.status().lifecycle is Lifecycle.LOCKED


def test_admin_reset_needs_the_issuer_key_and_has_its_own_counter(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.DIGEST)
    host.power_up()
    host.transport.power_cycle()
    for left in range(MAX_ADMIN_TRIES - 1, -1, -1):
        with pytest.raises(SeVerificationFailed) as failed:
            host.admin_reset(issuer_key=b"\x01" * 32, issuer_suite="p256")
        assert failed.value.sw == 0x63C0 | left
    with pytest.raises(SeBlocked):
        host.admin_reset(issuer_key=ISSUER_KEY, issuer_suite="p256")  # the real key, too late
    assert se.status().lifecycle is Lifecycle.LOCKED
    host.power_up()  # the binding itself is untouched


def test_admin_reset_cannot_replay_an_old_cryptogram(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.DIGEST)
    host.power_up()
    host.admin_reset(issuer_key=ISSUER_KEY, issuer_suite="p256")
    recorded = bus(host).exchanges[-1][0]
    host.power_up()
    powered_and_selected(se)
    send(se, CommandApdu(0, p.INS_GET_CHALLENGE, p.P1_CHALLENGE_ADMIN, 0, le=16))
    assert ResponseApdu.parse(se.transmit(recorded)).sw == 0x63C2
    assert se.status().lifecycle is Lifecycle.LOCKED


def test_mutual_services_need_a_valid_c_mac_and_a_bad_one_closes_the_session(
    make_host: HostFactory,
) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL)
    host.power_up()
    assert host.holder_data() == b"subscriber 42"
    assert send(se, HOLDER).sw == SW.SECURITY_STATUS_NOT_SATISFIED  # plain APDU: refused
    flip_last_data_byte = lambda c: c[:-2] + bytes((c[-2] ^ 1,)) + c[-1:]  # noqa: E731
    bus(host).tamper_command = flip_last_data_byte
    with pytest.raises(SeRefused) as refused:
        host.sign(b"pay 10.00")
    assert refused.value.sw == SW.SM_OBJECTS_INCORRECT
    bus(host).tamper_command = None
    with pytest.raises(SeNotVerified):  # the session is closed
        host.holder_data()
    host.power_up()
    assert host.holder_data() == b"subscriber 42"


def test_mutual_answers_are_r_mac_checked_by_the_host(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL)
    host.power_up()
    bus(host).tamper_response = lambda r: b"evil" + r[4:] if len(r) > 10 else r
    with pytest.raises(SeSecureMessagingFailed):
        host.holder_data()


def test_a_mutual_command_cannot_be_replayed_within_the_session(make_host: HostFactory) -> None:
    se = make_se()
    host = make_host(se, mode=Mode.MUTUAL)
    host.power_up()
    signature = host.sign(b"pay 10.00")
    assert signature
    replayed = bus(host).exchanges[-1][0]
    assert ResponseApdu.parse(se.transmit(replayed)).sw == SW.SM_OBJECTS_INCORRECT


# -- power cuts -----------------------------------------------------------------------


def _cut_points(record_size: int) -> list[tuple[str, int]]:
    return [("write", i) for i in range(record_size)] + [
        ("fsync", 0),
        ("rename", 0),
        ("dir-fsync", 0),
    ]


class Cutter:
    def __init__(self) -> None:
        self.target: tuple[int, str, int] | None = None  # (nth write, step, index)
        self.writes = 0
        self.fired = False

    def __call__(self, step: str, index: int) -> None:
        if step == "write" and index == 0:
            self.writes += 1
        if self.target and (self.writes, step, index) == self.target:
            self.fired = True
            raise PowerCut()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.DIGEST, Mode.MUTUAL])
def test_a_power_cut_at_every_write_step_of_registration_and_lock_leaves_a_usable_se(
    make_host: HostFactory, tmp_path_factory: pytest.TempPathFactory, mode: Mode
) -> None:
    # A dry run counts the NV writes of a first power-up (register, verify, lock) and
    # their sizes; then each (write, byte or step) gets a run with the power cut there.
    probe_dir = tmp_path_factory.mktemp("probe")
    sizes: list[int] = []
    nv = FileNvStore(probe_dir / "se.nv")
    make_se(nv=nv)
    original_store = nv.store
    nv.store = lambda record: (sizes.append(len(record)), original_store(record))[1]  # type: ignore[method-assign]
    probe_host = make_host(SecureElement(nv), mode=mode)
    probe_host.power_up()
    assert len(sizes) >= 3  # register/pair, verify (2 counter writes), lock
    checked = 0
    for nth, size in enumerate(sizes, start=1):
        step_points = _cut_points(size)
        # every byte of the first record-changing writes, a sample of the rest
        points = step_points if nth in (1, len(sizes)) else step_points[:: max(1, size // 16)]
        for step, index in points:
            directory = tmp_path_factory.mktemp("cut")
            cutter = Cutter()
            nv = FileNvStore(directory / "se.nv", hook=cutter)
            se = make_se(nv=nv)  # manufacture's write: before the cutter is armed
            cutter.writes = 0
            cutter.target = (nth, step, index)
            host = make_host(se, mode=mode, store_path=directory / "host.store")
            with pytest.raises(PowerCut):
                host.power_up()
            assert cutter.fired
            cutter.target = None
            # power comes back: the SE loads old or new state and the host finishes the job
            host.power_up()
            assert se.status().lifecycle is Lifecycle.LOCKED
            host.power_up()
            assert host.holder_data() == b"subscriber 42"
            assert not list(directory.glob(".se.nv.*.tmp"))  # stale temporaries cleared
            checked += 1
    assert checked > 200


def test_cutting_power_during_a_verification_still_costs_a_try(make_host: HostFactory) -> None:
    nv = MemoryNvStore()
    se = make_se(nv=nv)
    host = make_host(se, mode=Mode.DIGEST)
    host.power_up()
    powered_and_selected(se)
    send(se, CommandApdu(0, p.INS_GET_CHALLENGE, 0, 0, le=256))
    before = nv.writes
    original = nv.store

    def die_after_first_write(record: bytes) -> None:
        original(record)
        if nv.writes == before + 1:
            raise PowerCut()

    nv.store = die_after_first_write  # type: ignore[method-assign]
    with pytest.raises(PowerCut):  # a wrong guess, power cut before the SE could answer
        send(se, CommandApdu(0, 0x82, 0, 0, b"\x00" * 32))
    nv.store = original  # type: ignore[method-assign]
    se.reset()
    assert se.status().tries_left == MAX_VERIFY_TRIES - 1


def test_a_corrupt_nv_record_is_refused() -> None:
    nv = MemoryNvStore()
    se = make_se(nv=nv)
    assert nv.record is not None
    nv.record = nv.record[:-1] + bytes((nv.record[-1] ^ 1,))
    from trustfleet.binding.errors import SeNvUnreadable

    with pytest.raises(SeNvUnreadable):
        se.power_on()
