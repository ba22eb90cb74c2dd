"""Links between a host and an SE: in process, the vpcd TCP wire, and PC/SC.

vpcd (the virtual smart-card reader driver for pcscd, Debian package ``vsmartcard-vpcd``)
listens on TCP (port 35963 by default) and the *card* connects to it. Every message, both
ways, is a 2-byte big-endian length and a payload. A 1-byte payload from the reader is a
control code: 0 power off, 1 power on, 2 reset, 4 "send your ATR" (the card answers with
the ATR as a message); any longer payload is a C-APDU, answered with the R-APDU.

* :func:`serve_card` is the card side: it connects an applet to a vpcd endpoint (real vpcd
  inside pcscd, or :class:`VpcdReader`) and answers until stopped.
* :class:`VpcdReader` is the reader side without pcscd: the host listens like vpcd and
  talks to an emulator over the same wire.
* :class:`PcscTransport` drives a real (or vpcd) reader through pyscard.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from trustfleet.binding.errors import SeTransportError, SeUnsupported

if TYPE_CHECKING:
    from trustfleet.binding.secure_element import SecureElement

VPCD_PORT = 35963
CTRL_POWER_OFF = 0
CTRL_POWER_ON = 1
CTRL_RESET = 2
CTRL_ATR = 4
_MAX_MESSAGE = 0xFFFF


class Transport(Protocol):
    """How a host reaches its SE."""

    def transmit(self, command: bytes) -> bytes: ...

    def power_cycle(self) -> bytes:
        """Power the SE off and on again; return its ATR."""
        ...

    def close(self) -> None: ...


class InProcessTransport:
    """The applet object in this process (tests, benchmarks, the demo)."""

    def __init__(self, se: SecureElement) -> None:
        self.se = se

    def transmit(self, command: bytes) -> bytes:
        return self.se.transmit(command)

    def power_cycle(self) -> bytes:
        self.se.power_off()
        return self.se.power_on()

    def close(self) -> None:
        self.se.power_off()


# =====================================================================================
# The vpcd wire
# =====================================================================================


def send_message(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > _MAX_MESSAGE:
        raise SeTransportError("a vpcd message holds at most 65 535 bytes")
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def recv_message(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">H", _recv_exactly(sock, 2))
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise SeTransportError("the vpcd peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def answer_vpcd_message(se: SecureElement, message: bytes) -> bytes | None:
    """The card's answer to one vpcd message (None for power control codes)."""
    if len(message) == 1:
        code = message[0]
        if code == CTRL_ATR:
            from trustfleet.binding.secure_element import ATR

            return ATR
        if code == CTRL_POWER_OFF:
            se.power_off()
        elif code == CTRL_POWER_ON:
            se.power_on()
        elif code == CTRL_RESET:
            se.reset()
        return None
    if not se.powered:  # vpcd always powers the card first; be tolerant anyway
        se.power_on()
    return se.transmit(message)


def serve_card(
    se: SecureElement,
    host: str = "127.0.0.1",
    port: int = VPCD_PORT,
    *,
    stop: threading.Event | None = None,
    retry_interval: float = 0.2,
) -> None:
    """Connect ``se`` to the vpcd reader at host:port and answer it until ``stop`` is set.

    When the reader goes away (pcscd restarts, a host CLI exits) the card is powered off
    and reconnects, as if pulled out and inserted again.
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.settimeout(0.5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _serve_connection(se, sock, stop)
        except (OSError, SeTransportError):
            pass
        se.power_off()
        stop.wait(retry_interval)


def _serve_connection(se: SecureElement, sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            header = sock.recv(2, socket.MSG_PEEK)
        except TimeoutError:
            continue
        if not header:
            return
        message = recv_message(sock)
        answer = answer_vpcd_message(se, message)
        if answer is not None:
            send_message(sock, answer)


class VpcdReader:
    """The reader end of the vpcd wire, for hosts that talk to an emulator directly."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = VPCD_PORT, *, accept_timeout: float = 10.0
    ) -> None:
        self._server = socket.create_server((host, port))
        self._accept_timeout = accept_timeout
        self._card: socket.socket | None = None

    @property
    def port(self) -> int:
        return int(self._server.getsockname()[1])

    def wait_for_card(self) -> None:
        if self._card is not None:
            return
        self._server.settimeout(self._accept_timeout)
        try:
            card, _ = self._server.accept()
        except TimeoutError:
            raise SeTransportError("no card connected to the vpcd reader in time") from None
        card.settimeout(30.0)
        card.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._card = card

    def _sock(self) -> socket.socket:
        self.wait_for_card()
        assert self._card is not None
        return self._card

    def transmit(self, command: bytes) -> bytes:
        sock = self._sock()
        try:
            send_message(sock, command)
            return recv_message(sock)
        except OSError as exc:
            raise SeTransportError(f"vpcd link failed: {exc.strerror or exc}") from None

    def power_cycle(self) -> bytes:
        sock = self._sock()
        try:
            send_message(sock, bytes((CTRL_POWER_OFF,)))
            send_message(sock, bytes((CTRL_POWER_ON,)))
            send_message(sock, bytes((CTRL_ATR,)))
            return recv_message(sock)
        except OSError as exc:
            raise SeTransportError(f"vpcd link failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._card is not None:
            self._card.close()
            self._card = None
        self._server.close()


# =====================================================================================
# PC/SC
# =====================================================================================


class PcscTransport:
    """A PC/SC reader through pyscard (``pip install trustfleet[pcsc]``)."""

    def __init__(self, reader: str | None = None, *, wait: float = 10.0) -> None:
        try:
            from smartcard.System import readers
        except ImportError:
            raise SeUnsupported("PC/SC needs pyscard: pip install 'trustfleet[pcsc]'") from None
        self._connection = self._connect(readers, reader, wait)

    @staticmethod
    def _connect(readers: Any, wanted: str | None, wait: float) -> Any:
        from smartcard.Exceptions import CardConnectionException, NoCardException

        deadline = time.monotonic() + wait
        while True:
            try:
                available = [r for r in readers() if wanted is None or str(r) == wanted]
                if available:
                    connection = available[0].createConnection()
                    connection.connect()
                    return connection
            except (NoCardException, CardConnectionException):
                pass
            except Exception as exc:  # pyscard raises its own base classes for PC/SC errors
                if time.monotonic() > deadline:
                    raise SeTransportError(f"PC/SC: {exc}") from None
            if time.monotonic() > deadline:
                raise SeTransportError(f"no card in reader {wanted or '(any)'}")
            time.sleep(0.1)

    def transmit(self, command: bytes) -> bytes:
        from smartcard.Exceptions import CardConnectionException

        try:
            data, sw1, sw2 = self._connection.transmit(list(command))
        except CardConnectionException as exc:
            raise SeTransportError(f"PC/SC transmit failed: {exc}") from None
        return bytes(data) + bytes((sw1, sw2))

    def power_cycle(self) -> bytes:
        from smartcard.Exceptions import CardConnectionException
        from smartcard.scard import SCARD_UNPOWER_CARD

        try:
            self._connection.reconnect(disposition=SCARD_UNPOWER_CARD)
            return bytes(self._connection.getATR())
        except CardConnectionException as exc:
            raise SeTransportError(f"PC/SC power cycle failed: {exc}") from None

    def close(self) -> None:
        self._connection.disconnect()


def list_pcsc_readers() -> list[str]:
    try:
        from smartcard.System import readers
    except ImportError:
        raise SeUnsupported("PC/SC needs pyscard: pip install 'trustfleet[pcsc]'") from None
    return [str(r) for r in readers()]
