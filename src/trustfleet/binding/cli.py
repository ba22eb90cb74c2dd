"""``trustfleet se``: make and emulate a secure element, bind, verify and inspect it from
the host side (reporting its events to the server's fleet view with ``--server``), read
the fleet view (``se fleet``, ``se flags``, ``se events``, ``se ack``), plus the demo step.

The host side reaches the SE in one of three ways: ``--nv FILE`` (the applet in this
process, on its NV file), ``--reader NAME`` (a PC/SC reader, e.g. vpcd's inside pcscd),
or ``--vpcd-listen HOST:PORT`` (this command plays the vpcd reader and waits for
``trustfleet se emulate`` to connect).

The fleet-view verbs are clients of the HTTP API like every management verb: ``--server``
or ``TRUSTFLEET_ADDR`` with the token of ``TRUSTFLEET_TOKEN`` or the login file (never the
command line), or the local data directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from trustfleet.binding.errors import (
    SeBoundElsewhere,
    SeError,
    SeNotVerified,
    SeTokenMissing,
)
from trustfleet.binding.fleet import FLAG_STATUS_FILTERS, RULES
from trustfleet.binding.host import BindingEvent, Host, HostKey, HostStore, Reporter
from trustfleet.binding.protocol import Lifecycle, Mode, SeStatus
from trustfleet.binding.reporting import HttpReporter
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
from trustfleet.kit.cli import api, console, emit, err_console, state, wrapping_table
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
ADDR_ENV = "TRUSTFLEET_ADDR"
QUEUE_FILE = "reports.queue"
ReportOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar=ADDR_ENV,
        help="Report the events to this server's fleet view (token: $TRUSTFLEET_TOKEN).",
    ),
]


class FlagStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    ALL = "all"


class FlagRule(StrEnum):
    FOREIGN_FAILURE = "foreign-failure"
    FOREIGN_VERIFICATION = "foreign-verification"
    MOVED = "moved"
    UNKNOWN_FAILURE = "unknown-failure"
    HOME_FAILURE = "home-failure"


assert tuple(FlagStatus) == FLAG_STATUS_FILTERS and tuple(FlagRule) == tuple(RULES)


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
    reporter: Reporter | None = None,
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
        reporter=reporter or _print_event,
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


@contextlib.contextmanager
def _reporting(host_dir: Path, server: str | None) -> Iterator[Reporter]:
    """The host's events printed, and posted to ``server``'s fleet view when given
    (queued in the host directory while it cannot be reached). Reporting never stops a
    power-up: without a token it warns and only prints."""
    if server is None:
        yield _print_event
        return
    host_dir.mkdir(parents=True, exist_ok=True)
    try:
        http = HttpReporter.to_server(server, queue_file=host_dir / QUEUE_FILE)
    except SeTokenMissing as missing:
        err_console.print(escape(f"warning [{missing.code}]: {missing.message}"))
        yield _print_event
        return

    def print_and_post(event: BindingEvent) -> None:
        _print_event(event)
        http(event)

    try:
        yield print_and_post
    finally:
        http.close()
        if http.pending:
            err_console.print(
                escape(
                    f"{http.pending} event(s) not reported yet, queued in"
                    f" {host_dir / QUEUE_FILE}: sent at a later power-up"
                )
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
    server: ReportOption = None,
) -> None:
    """First power-up: register, store the credential, verify, lock (or verify if bound)."""
    transport = _transport(nv, reader, vpcd_listen)
    try:
        with _reporting(host_dir, server) as reporter:
            host = _host(
                transport,
                host_dir,
                device_id=device_id,
                mode=mode,
                suite=suite,
                r1_from=r1_from,
                bind=True,
                reporter=reporter,
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
    server: ReportOption = None,
) -> None:
    """Every power-up: power the SE and prove the binding; exit 1 if it refuses."""
    transport = _transport(nv, reader, vpcd_listen)
    try:
        with _reporting(host_dir, server) as reporter:
            host = _host(transport, host_dir, reporter=reporter)
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
    table = wrapping_table("field", "value", show_header=False)
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
# The fleet view (the server's operator API)
# =====================================================================================


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


@app.command("fleet")
def fleet(
    flagged: Annotated[bool, typer.Option("--flagged", help="Only SEs with an open flag.")] = False,
    device: Annotated[str | None, typer.Option(help="Only SEs bound to this host.")] = None,
    after: Annotated[str | None, typer.Option(help="The page after this SE ID.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1..500).")] = 100,
) -> None:
    """The secure elements the hosts reported: bound host, last event, open flags."""
    page = api().get(
        "/v1/se/elements", flagged=flagged or None, device=device, after=after, limit=limit
    )
    if state.json_output:
        emit(page, lambda: None)
        return
    table = wrapping_table(
        "SE ID", "bound host", "locked", "binds", "last event", "at", "open flags"
    )
    for e in page["elements"]:
        table.add_row(
            e["se_id"],
            escape(e["bound_device"] or "-"),
            "yes" if e["locked"] else "no",
            str(e["binds"]),
            escape(f"{e['last_kind']} in {e['last_device']}"),
            _when(e["last_at"]),
            str(e["open_flags"]) if e["open_flags"] else "",
        )
    console.print(table)
    if page["next_after"]:
        console.print(f"more: --after {page['next_after']}")


@app.command("flags")
def flags(
    status: Annotated[
        FlagStatus, typer.Option(help="open, acknowledged or all.")
    ] = FlagStatus.OPEN,
    se: Annotated[str | None, typer.Option("--se", help="Only this SE ID.")] = None,
    device: Annotated[
        str | None, typer.Option(help="Only flags raised by, or bound to, this host.")
    ] = None,
    rule: Annotated[FlagRule | None, typer.Option(help="Only flags of this rule.")] = None,
    after: Annotated[int | None, typer.Option(help="The page after this flag id.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1..500).")] = 100,
) -> None:
    """What the fleet's reports flagged (a likely theft is foreign-failure), oldest first."""
    se_id = se.lower() if se else None
    page = api().get(
        "/v1/se/flags",
        status=status.value,
        se_id=se_id,
        device=device,
        rule=rule.value if rule else None,
        after=after,
        limit=limit,
    )
    if state.json_output:
        emit(page, lambda: None)
        return
    table = wrapping_table(
        "id", "rule", "SE ID", "host", "bound host", "reports", "raised", "status"
    )
    for f in page["flags"]:
        table.add_row(
            str(f["id"]),
            f["rule"],
            f["se_id"],
            escape(f["device_id"]),
            escape(f["bound_device"] or "-"),
            str(f["count"]),
            _when(f["raised_at"]),
            f["status"],
        )
    console.print(table)
    for rule_name in sorted({f["rule"] for f in page["flags"]}):
        console.print(f"{rule_name}: {RULES.get(rule_name, '')}", highlight=False)
    if page["next_after"]:
        console.print(f"more: --after {page['next_after']}")


@app.command("events")
def events(
    se_id: Annotated[str, typer.Argument(help="The SE ID (32 hex digits).")],
    before: Annotated[int | None, typer.Option(help="The page before this event id.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1..500).")] = 20,
) -> None:
    """What the hosts reported about one SE, newest first."""
    page = api().get(f"/v1/se/elements/{se_id.lower()}/events", before=before, limit=limit)
    if state.json_output:
        emit(page, lambda: None)
        return
    table = wrapping_table("id", "event", "host", "received", "host's clock", "reported by")
    for e in page["events"]:
        table.add_row(
            str(e["id"]),
            e["kind"],
            escape(e["device_id"]),
            _when(e["received_at"]),
            _when(e["reported_at"]),
            escape(e["reported_by"]),
        )
    console.print(table)


@app.command("ack")
def acknowledge(
    flag_id: Annotated[int, typer.Argument(help="The flag's id (from `se flags`).")],
    note: Annotated[str, typer.Option(help="What you found (kept in the audit log).")] = "",
) -> None:
    """Acknowledge a flag: looked at. The next report breaking the rule opens a new one."""
    flag = api().post(f"/v1/se/flags/{flag_id}/acknowledge", {"note": note})
    if state.json_output:
        emit(flag, lambda: None)
        return
    console.print(
        escape(f"flag {flag['id']} ({flag['rule']}, SE {flag['se_id']}) acknowledged"),
        highlight=False,
    )


# =====================================================================================
# The demo step: the device side, reporting to the fleet view of the demo's server
# =====================================================================================


def demo_step(env: DemoEnv) -> None:
    """Bind, lock, power-cycle and verify; then move the SE to a second host: it refuses
    service, and the server's fleet view flags the theft."""
    console.rule("[bold]se: secure element bound to its host, and the fleet view")
    tokens = env.tokens("se", "device-gateway", "operator")
    operator = tokens["operator"]
    http = HttpReporter(env.client, tokens["device-gateway"])

    def report(event: BindingEvent) -> None:
        _print_event(event)
        http(event)

    workdir = env.workdir / "se"
    workdir.mkdir()
    issuer_key = bytes(32)  # a demo issuer; real issuers keep theirs in an HSM
    se = SecureElement.manufacture(
        MemoryNvStore(), issuer_key=issuer_key, holder_data=b"subscriber 460-01-1234"
    )
    se_id = se.se_id.hex()
    console.print(f"SE {se_id} manufactured (blank, reset key diversified by SE ID)")
    owner = _host(
        InProcessTransport(se),
        workdir / "gateway-1",
        device_id="gateway-1",
        bind=True,
        reporter=report,
    )
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
    honest = env.call("GET", "/v1/se/flags", token=operator, params={"status": "all"})
    events = env.call("GET", f"/v1/se/elements/{se_id}/events", token=operator)["events"]
    console.print(
        f"fleet view: {len(events)} events reported by gateway-1 (device-gateway token),"
        f" {len(honest['flags'])} flags"
    )

    console.print("the SE is pulled out and put into gateway-2 ...")
    thief = _host(
        InProcessTransport(se),
        workdir / "gateway-2",
        device_id="gateway-2",
        bind=True,
        reporter=report,
    )
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

    flagged = env.call("GET", "/v1/se/flags", token=operator)["flags"]
    if honest["flags"] or [f["rule"] for f in flagged] != ["foreign-failure"] or http.pending:
        raise SeError("the fleet view should hold exactly the theft flag")
    (flag,) = flagged
    console.print(
        escape(
            f"fleet view (operator): flag #{flag['id']} [{flag['rule']}] SE {flag['se_id']}"
            f" bound to {flag['bound_device']} failed in {flag['device_id']}: likely theft"
        ),
        highlight=False,
    )
    owner.power_up()
    console.print("back in gateway-1: verified again, services open")
    element = env.call("GET", f"/v1/se/elements/{se_id}", token=operator)
    console.print(
        escape(
            f"fleet view: SE bound to {element['bound_device']} (locked:"
            f" {'yes' if element['locked'] else 'no'}), last event {element['last_kind']} in"
            f" {element['last_device']}, {element['open_flags']} open flag"
        )
    )
    acknowledged = env.call(
        "POST",
        f"/v1/se/flags/{flag['id']}/acknowledge",
        token=operator,
        json={"note": "demo: moved on purpose"},
    )
    console.print(f"operator acknowledged flag #{acknowledged['id']} ({acknowledged['status']})")
