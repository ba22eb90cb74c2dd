"""The vpcd wire without pcscd: the applet served by ``serve_card`` in a thread, the host
acting as the reader (``VpcdReader``) over loopback TCP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustfleet.binding.errors import SeBoundElsewhere, SeNotVerified
from trustfleet.binding.host import Host, HostKey, HostStore
from trustfleet.binding.protocol import Lifecycle, Mode, sign_command
from trustfleet.binding.secure_element import ATR, SecureElement
from trustfleet.binding.storage import FileNvStore
from trustfleet.binding.transport import (
    CTRL_ATR,
    VpcdReader,
    recv_message,
    send_message,
    serve_card,
)
from trustfleet.wire.apdu import SW, ResponseApdu

from .conftest import ISSUER_KEY


@pytest.fixture
def card(tmp_path: Path) -> Iterator[tuple[SecureElement, VpcdReader]]:
    se = SecureElement.manufacture(
        FileNvStore(tmp_path / "se.nv"), issuer_key=ISSUER_KEY, holder_data=b"over tcp"
    )
    reader = VpcdReader("127.0.0.1", 0, accept_timeout=10)
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_card, args=(se, "127.0.0.1", reader.port), kwargs={"stop": stop}
    )
    thread.start()
    try:
        yield se, reader
    finally:
        stop.set()
        reader.close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def _host(reader: VpcdReader, tmp_path: Path, name: str) -> Host:
    key = HostKey.load_or_create(tmp_path / f"{name}.key")
    store = HostStore(tmp_path / f"{name}.store", key)
    return Host(reader, store, device_id=name, mode=Mode.MUTUAL)


def test_bind_and_verify_over_the_vpcd_wire(
    card: tuple[SecureElement, VpcdReader], tmp_path: Path
) -> None:
    se, reader = card
    host = _host(reader, tmp_path, "owner")
    assert host.power_up().bound_now
    assert se.status().lifecycle is Lifecycle.LOCKED
    for _ in range(3):
        assert host.power_up().apdus == 3
        assert host.holder_data() == b"over tcp"
    assert reader.power_cycle() == ATR  # power off/on over the wire clears the verification
    assert ResponseApdu.parse(reader.transmit(bytes.fromhex("00A4040007F074665345420100"))).ok
    refused = ResponseApdu.parse(reader.transmit(sign_command(b"x").encode()))
    assert refused.sw == SW.SECURITY_STATUS_NOT_SATISFIED
    thief = _host(reader, tmp_path, "thief")
    with pytest.raises(SeBoundElsewhere):
        thief.power_up()
    with pytest.raises(SeNotVerified):
        thief.sign(b"x")


def test_the_card_side_speaks_the_vpcd_framing() -> None:
    """Length-prefixed messages; a 1-byte 04 asks for the ATR; other 1-byte codes are
    power control and get no answer; anything longer is an APDU."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        se = SecureElement.manufacture(FileNvStore(Path(tmp) / "se.nv"), issuer_key=ISSUER_KEY)
        server = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()
        port = server.getsockname()[1]
        thread = threading.Thread(
            target=serve_card, args=(se, "127.0.0.1", port), kwargs={"stop": stop}
        )
        thread.start()
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            conn.settimeout(10)
            send_message(conn, bytes((CTRL_ATR,)))
            assert recv_message(conn) == ATR
            send_message(conn, b"\x01")  # power on: no answer
            send_message(conn, bytes.fromhex("00A4040007F074665345420100"))
            answer = recv_message(conn)
            assert answer[-2:] == b"\x90\x00"
            conn.close()
        finally:
            stop.set()
            server.close()
            thread.join(timeout=5)
