"""``trustfleet se``: make and emulate a secure element, and bind, verify and inspect it
from the host side, plus the demo step.

The host side reaches the SE in one of three ways: ``--nv FILE`` (the applet in this
process, on its NV file), ``--reader NAME`` (a PC/SC reader, e.g. vpcd's inside pcscd),
or ``--vpcd-listen HOST:PORT`` (this command plays the vpcd reader and waits for
``trustfleet se emulate`` to connect).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trustfleet.binding.errors import SeBoundElsewhere, SeError, SeNotVerified
from trustfleet.binding.host import BindingEvent, Host, HostKey, HostStore
from trustfleet.binding.protocol import Lifecycle, Mode, SeStatus
from trustfleet.binding.secure_element import SecureElement
from trustfleet.binding.storage import FileNvStore, MemoryNvStore
from trustfleet.binding.transport import (
    VPCD_PORT,
    InProcessTransport,
    PcscTransport,
    Transport,
    VpcdReader,
    serve_card,
)
from trustfleet.errors import InvalidInput
from trustfleet.kit.cli import console
from trustfleet.kit.demo import DemoEnv
from trustfleet.store.files import read_small_file

app = typer.Typer(no_args_is_help=True, help="Secure elements bound to their host (spec §1).")

NvOption = Annotated[Path | None, typer.Option("--nv", help="SE NV file: the applet in process.")]
ReaderOption = Annotated[
    str | None, typer.Option("--reader", help="PC/SC reader name ('any' for the first).")
]
ListenOption = Annotated[
    str | None,
    typer.Option("--vpcd-listen", help="HOST:PORT to listen on as a vpcd reader."),
]
HostDir = Annotated[Path, typer.Option("--host-dir", help="The host's key and binding store.")]
DEFAULT_HOST_DIR = Path("se-host")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _transport(nv: Path | None, reader: str | None, listen: str | None) -> Transport:
    chosen = [x for x in (nv, reader, listen) if x is not None]
    if len(chosen) != 1:
        raise InvalidInput("give exactly one of --nv, --reader or --vpcd-listen")
    if nv is not None:
        se = SecureElement(FileNvStore(nv))
        se.power_on()
        return InProcessTransport(se)
    if reader is not None:
        return PcscTransport(None if reader == "any" else reader)
    assert listen is not None
    host, port = _address(listen)
    return VpcdReader(host, port, accept_timeout=30)


def _host(
    transport: Transport,
    host_dir: Path,
    *,
    device_id: str | None = None,
    mode: Mode = Mode.MUTUAL,
    suite: str = "p256",
    r1_from: str = "se",
    bind: bool = False,
) -> Host:
    host_dir.mkdir(parents=True, exist_ok=True)
    id_file = host_dir / "device-id"
    if device_id is None:
        device_id = id_file.read_text().strip() if id_file.exists() else "host"
    elif not id_file.exists():
        id_file.write_text(device_id + "\n")
    key = HostKey.load_or_create(host_dir / "host.key")
    return Host(
        transport,
        HostStore(host_dir / "bindings.store", key),
        device_id=device_id,
        mode=mode,
        suite=suite,
        r1_from_host=r1_from == "host",
        bind_if_needed=bind,
        reporter=_print_event,
    )


def _issuer_key(path: Path, *, create: bool) -> bytes:
    """The issuer's 32-byte master key file (mode 0600); made when ``create`` and missing."""
    if create and not path.exists():
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
        console.print(f"issuer key made: {escape(str(path))} (keep it offline)")
        return secret
    try:
        secret = read_small_file(path, 32)
    except (OSError, ValueError):
        raise InvalidInput("the issuer key file cannot be read") from None
    if len(secret) != 32:
        raise InvalidInput("an issuer key file holds exactly 32 bytes")
    return secret


def _print_event(event: BindingEvent) -> None:
    when = event.time.strftime("%H:%M:%S")
    console.print(
        f"[dim]  event {event.kind.value}: {escape(event.device_id)}, SE {event.se_id.hex()}"
        f" at {when}[/dim]",
        highlight=False,
    )


@app.command("manufacture")
def manufacture(
    nv: Annotated[Path, typer.Option("--nv", help="The new SE's NV file.")],
    issuer_key: Annotated[
        Path, typer.Option(help="The issuer's 32-byte master key file (made if missing).")
    ],
    issuer_suite: Annotated[str, typer.Option(help="p256 or gm.")] = "p256",
    holder_data: Annotated[str, typer.Option(help="Protected data object D1.")] = "",
) -> None:
    """Make a blank SE: random SE ID, reset key diversified from the issuer key."""
    se = SecureElement.manufacture(
        FileNvStore(nv),
        issuer_key=_issuer_key(issuer_key, create=True),
        issuer_suite=issuer_suite,
        holder_data=holder_data.encode(),
    )
    console.print(f"SE {se.se_id.hex()} made in {escape(str(nv))} (issuer suite {issuer_suite})")


@app.command("emulate")
def emulate(
    nv: Annotated[Path, typer.Option("--nv", help="The SE's NV file.")],
    vpcd: Annotated[str, typer.Option(help="vpcd's HOST:PORT.")] = f"127.0.0.1:{VPCD_PORT}",
) -> None:
    """Run the applet behind vpcd (pcscd's virtual reader) until interrupted."""
    se = SecureElement(FileNvStore(nv))
    host, port = _address(vpcd)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"SE {se.se_id.hex()} inserted in vpcd at {host}:{port}", highlight=False)
    with contextlib.suppress(KeyboardInterrupt):
        serve_card(se, host, port, stop=stop)
    console.print("SE removed")


@app.command("bind")
def bind(
    device_id: Annotated[str, typer.Option(help="This host's device ID.")],
    host_dir: HostDir = DEFAULT_HOST_DIR,
    mode: Annotated[Mode, typer.Option(help="Binding mode.")] = Mode.MUTUAL,
    suite: Annotated[str, typer.Option(help="p256 (international) or gm.")] = "p256",
    r1_from: Annotated[str, typer.Option(help="Who makes R1 (digest, cipher): se or host.")] = "se",
    nv: NvOption = None,
    reader: ReaderOption = None,
    vpcd_listen: ListenOption = None,
) -> None:
    """First power-up: register, store the credential, verify, lock (or verify if bound)."""
    transport = _transport(nv, reader, vpcd_listen)
    try:
        host = _host(
            transport,
            host_dir,
            device_id=device_id,
            mode=mode,
            suite=suite,
            r1_from=r1_from,
            bind=True,
        )
        result = host.power_up()
    finally:
        transport.close()
    verb = "bound and locked" if result.bound_now else "already bound here; verified"
    console.print(f"SE {result.se_id.hex()} {verb} ({result.mode.value}, {result.suite})")


@app.command("verify")
def verify(
    host_dir: HostDir = DEFAULT_HOST_DIR,
    nv: NvOption = None,
    reader: ReaderOption = None,
    vpcd_listen: ListenOption = None,
) -> None:
    """Every power-up: power the SE and prove the binding; exit 1 if it refuses."""
    transport = _transport(nv, reader, vpcd_listen)
    try:
        host = _host(transport, host_dir)
        result = host.power_up()
        holder = host.holder_data()
    finally:
        transport.close()
    console.print(
        f"SE {result.se_id.hex()} verified ({result.mode.value}, {result.suite},"
        f" {result.apdus} APDU exchanges); services open, holder data {len(holder)} bytes"
    )


@app.command("status")
def status(
    host_dir: HostDir = DEFAULT_HOST_DIR,
    nv: NvOption = None,
    reader: ReaderOption = None,
    vpcd_listen: ListenOption = None,
) -> None:
    """What the SE says about itself, and whether this host holds a credential for it."""
    transport = _transport(nv, reader, vpcd_listen)
    try:
        transport.power_cycle()
        host = _host(transport, host_dir)
        se = host.select()
    finally:
        transport.close()
    _print_status(se, host.store.credential(se.se_id) is not None)


def _print_status(se: SeStatus, known: bool) -> None:
    table = Table("field", "value", show_header=False)
    table.add_row("SE ID", se.se_id.hex())
    table.add_row("lifecycle", se.lifecycle.name.lower())
    table.add_row("mode", se.mode.value if se.mode else "-")
    table.add_row("suite", se.suite or "-")
    table.add_row("verification tries left", str(se.tries_left))
    table.add_row("reset tries left", str(se.admin_tries_left))
    table.add_row("this host holds its credential", "yes" if known else "no")
    console.print(table)


@app.command("reset")
def reset(
    issuer_key: Annotated[Path, typer.Option(help="The issuer's master key file.")],
    issuer_suite: Annotated[str, typer.Option(help="p256 or gm.")] = "p256",
    host_dir: HostDir = DEFAULT_HOST_DIR,
    nv: NvOption = None,
    reader: ReaderOption = None,
    vpcd_listen: ListenOption = None,
) -> None:
    """The issuer's authorised reset: unlock and unblock the SE (it becomes blank)."""
    key = _issuer_key(issuer_key, create=False)
    transport = _transport(nv, reader, vpcd_listen)
    try:
        transport.power_cycle()
        host = _host(transport, host_dir)
        host.admin_reset(issuer_key=key, issuer_suite=issuer_suite)
    finally:
        transport.close()
    console.print("SE reset: blank, ready to be bound again")


# =====================================================================================
# The demo step (device side only: needs no server)
# =====================================================================================


def demo_step(env: DemoEnv) -> None:
    """Bind, lock, power-cycle and verify; then move the SE to a second host."""
    console.rule("[bold]se: secure element bound to its host (device side)")
    workdir = env.workdir / "se"
    workdir.mkdir()
    issuer_key = bytes(32)  # a demo issuer; real issuers keep theirs in an HSM
    se = SecureElement.manufacture(
        MemoryNvStore(), issuer_key=issuer_key, holder_data=b"subscriber 460-01-1234"
    )
    console.print(f"SE {se.se_id.hex()} manufactured (blank, reset key diversified by SE ID)")
    owner = _host(InProcessTransport(se), workdir / "gateway-1", device_id="gateway-1", bind=True)
    first = owner.power_up()
    console.print(
        f"gateway-1 first power-up: {first.mode.value} pairing ({first.suite}), credential"
        f" stored encrypted, BIND LOCK sent; SE lifecycle {se.status().lifecycle.name.lower()}"
    )
    for cycle in range(1, 4):
        result = owner.power_up()
        console.print(f"power cycle {cycle}: verified in {result.apdus} APDU exchanges")
    signature = owner.sign(b"meter reading 1234 kWh")
    console.print(f"service: SE signed for gateway-1 ({len(signature)}-byte signature, C-MAC'd)")

    console.print("the SE is pulled out and put into gateway-2 ...")
    thief = _host(InProcessTransport(se), workdir / "gateway-2", device_id="gateway-2", bind=True)
    try:
        thief.power_up()
    except SeBoundElsewhere as refused:
        console.print(escape(f"gateway-2 power-up refused: [{refused.code}] {refused.message}"))
    services: list[tuple[str, Callable[[], bytes]]] = [
        ("a signature", lambda: thief.sign(b"x")),
        ("the holder data", thief.holder_data),
    ]
    for name, call in services:
        try:
            call()
        except SeNotVerified as refused:
            console.print(f"gateway-2 asks for {name}: SE answers {refused.sw:04X}")
    if se.status().lifecycle is not Lifecycle.LOCKED:
        raise SeError("the demo SE should still be locked")
    owner.power_up()
    console.print("back in gateway-1: verified again, services open")
