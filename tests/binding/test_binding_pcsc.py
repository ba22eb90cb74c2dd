"""End to end over PC/SC: pcscd with vsmartcard's vpcd driver, the applet behind it
(``trustfleet se emulate``), the host side through pyscard.

pcscd (Debian 12, pcsc-lite 1.9.9) always serves /run/pcscd/pcscd.comm; to keep the test
from touching (or colliding with) a system pcscd, it runs in a private mount namespace
(``unshare -m``, root) with a temporary directory bound over /run/pcscd, and the client
library is pointed at the socket in that directory with PCSCLITE_CSOCK_NAME. vpcd listens
on a free port given in its own reader.conf. ``scripts/dev`` installs pcscd,
vsmartcard-vpcd and what pyscard needs to build; in CI a missing piece fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustfleet.binding.errors import SeBoundElsewhere, SeNotVerified
from trustfleet.binding.host import Host, HostKey, HostStore
from trustfleet.binding.protocol import (
    CLA_ISO,
    CLA_PROPRIETARY,
    INS_EXTERNAL_AUTHENTICATE,
    INS_GET_CHALLENGE,
    INS_INITIALIZE,
    Lifecycle,
    Mode,
    SeStatus,
    sign_command,
)
from trustfleet.wire.apdu import SW, CommandApdu, ResponseApdu

from .conftest import ISSUER_KEY

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if shutil.which("pcscd") is None:
        return "pcscd is not installed"
    if not VPCD_DRIVER.exists():
        return "vsmartcard-vpcd is not installed"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "a private mount namespace needs unshare and root"
    try:
        import smartcard  # noqa: F401
    except ImportError:
        return "pyscard is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"PC/SC end-to-end test cannot run in CI: {missing}")
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("pcsc")
    (base / "conf").mkdir()
    (base / "run").mkdir()
    port = _free_port()
    (base / "conf" / "vpcd").write_text(
        'FRIENDLYNAME "trustfleet test reader"\n'
        f"DEVICENAME /dev/null:{port}\n"
        f"LIBPATH {VPCD_DRIVER}\n"
        f"CHANNELID {port}\n"
    )
    script = (
        f"mkdir -p /run/pcscd && mount --bind {base / 'run'} /run/pcscd"
        f" && exec pcscd --foreground --config {base / 'conf'}"
    )
    log = (base / "pcscd.log").open("wb")
    daemon = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=log, stderr=log)
    socket_path = base / "run" / "pcscd.comm"
    try:
        _wait_for(socket_path.exists, "pcscd's socket")
        os.environ["PCSCLITE_CSOCK_NAME"] = str(socket_path)
        yield base, port
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        log.close()


@pytest.fixture
def emulator(pcscd: tuple[Path, int], tmp_path: Path) -> Iterator[Path]:
    """`trustfleet se emulate` on a freshly made SE, inserted in the vpcd reader."""
    _, port = pcscd
    nv = tmp_path / "se.nv"
    issuer = tmp_path / "issuer.key"
    issuer.write_bytes(ISSUER_KEY)
    cli = [sys.executable, "-m", "trustfleet.cli", "se"]
    made = subprocess.run(
        [
            *cli,
            "manufacture",
            "--nv",
            str(nv),
            "--issuer-key",
            str(issuer),
            "--holder-data",
            "pcsc",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    process = subprocess.Popen(
        [*cli, "emulate", "--nv", str(nv), "--vpcd", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield nv
    finally:
        process.terminate()
        process.wait(timeout=10)


def _reader() -> str:
    from smartcard.System import readers

    names = [str(r) for r in readers()]
    return next(n for n in names if n.startswith("trustfleet test reader") and n.endswith("00"))


def _pcsc_host(tmp_path: Path, name: str) -> Host:
    from trustfleet.binding.transport import PcscTransport

    transport = PcscTransport(_reader(), wait=20)
    key = HostKey.load_or_create(tmp_path / f"{name}.key")
    return Host(transport, HostStore(tmp_path / f"{name}.store", key), device_id=name)


def _send(host: Host, cmd: CommandApdu) -> ResponseApdu:
    return ResponseApdu.parse(host.transport.transmit(cmd.encode()))


def test_bind_verify_and_refuse_a_stolen_se_through_pcscd_and_pyscard(
    emulator: Path, tmp_path: Path
) -> None:
    owner = _pcsc_host(tmp_path, "owner")
    try:
        assert owner.power_up().bound_now
        for _ in range(3):
            assert owner.power_up().apdus == 3
            assert owner.holder_data() == b"pcsc"
            assert owner.sign(b"reading 42")
        status = owner.select()
        assert status.lifecycle is Lifecycle.LOCKED and status.mode is Mode.MUTUAL
        # after a power cycle through pcscd, a service before verification answers 6982
        owner.transport.power_cycle()
        owner.select()
        assert _send(owner, sign_command(b"x")).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    finally:
        owner.transport.close()

    thief = _pcsc_host(tmp_path, "thief")
    try:
        with pytest.raises(SeBoundElsewhere):
            thief.power_up()
        with pytest.raises(SeNotVerified):
            thief.holder_data()
        # a forged host cryptogram costs a try and opens nothing
        initialize = CommandApdu(CLA_PROPRIETARY, INS_INITIALIZE, 0, 0, bytes(16), 256)
        assert _send(thief, initialize).sw == SW.OK
        forged = CommandApdu(CLA_ISO, INS_EXTERNAL_AUTHENTICATE, 0, 0, bytes(16))
        assert _send(thief, forged).sw == 0x63C4
        assert _send(thief, sign_command(b"x")).sw == SW.SECURITY_STATUS_NOT_SATISFIED
    finally:
        thief.transport.close()


def test_status_words_of_a_brute_force_through_pcscd(emulator: Path, tmp_path: Path) -> None:
    owner = _pcsc_host(tmp_path, "owner")
    try:
        owner.mode = Mode.DIGEST
        owner.power_up()
        owner.transport.power_cycle()
        status = owner.select()
        assert isinstance(status, SeStatus) and status.mode is Mode.DIGEST
        seen = []
        for _ in range(6):
            _send(owner, CommandApdu(CLA_ISO, INS_GET_CHALLENGE, 0, 0, le=256))
            guess = CommandApdu(CLA_ISO, INS_EXTERNAL_AUTHENTICATE, 0, 0, bytes(32))
            seen.append(_send(owner, guess).sw)
        assert seen == [0x63C4, 0x63C3, 0x63C2, 0x63C1, 0x63C0, 0x6983]
    finally:
        owner.transport.close()
