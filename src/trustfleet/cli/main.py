"""trustfleet: init, serve, login, tokens, audit, CA, key store, capabilities and the demo.

Management verbs call the HTTP API: a running server with --server URL (or
TRUSTFLEET_ADDR), else the local data directory in process.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from trustfleet.kit.cli import (
    EXIT_REFUSED,
    UsageProblem,
    api,
    console,
    emit,
    err_console,
    install_global_options,
    run,
    server_required,
    state,
    wrapping_table,
)
from trustfleet.kit.credentials import forget_token, store_token
from trustfleet.server.models import Role

if TYPE_CHECKING:
    from trustfleet.kit.outbox import DeliveryWorker
    from trustfleet.server.context import AppContext

app = typer.Typer(no_args_is_help=True, add_completion=True, help=__doc__)
token_app = typer.Typer(no_args_is_help=True, help="API tokens (one role each).")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
emulate_app = typer.Typer(no_args_is_help=True, help="Reference devices (emulators).")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(emulate_app, name="emulate")
install_global_options(app)

TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# =====================================================================================
# The data directory and the server
# =====================================================================================


@app.command()
def init() -> None:
    """Create the data directory: master key, database, local CA and an admin token."""
    from trustfleet.bootstrap import initialise

    result = initialise(state.settings)
    console.print(f"data directory: {escape(str(result.data_dir))}")
    if result.admin_token is None:
        console.print("already initialised; nothing changed")
        return
    console.print(f"local root CA: {escape(str(result.root_ca_pem_path))}")
    console.print("admin API token (shown once, store it now):")
    console.print(result.admin_token, soft_wrap=True, highlight=False)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8080).")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="TLS certificate chain (PEM); needs --tls-key.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_local_ca: Annotated[
        bool,
        typer.Option(
            "--tls-local-ca",
            help="Serve TLS with a certificate issued by the local CA (clients verify it with"
            " --ca-file <data dir>/ca/root.pem).",
        ),
    ] = False,
    tls_name: Annotated[
        list[str] | None,
        typer.Option(help="Another host name or IP for --tls-local-ca's certificate."),
    ] = None,
    insecure_http: Annotated[
        bool,
        typer.Option(
            "--insecure-http",
            help="Allow plain HTTP on a non-loopback address (e.g. behind a TLS proxy).",
        ),
    ] = False,
    init_if_missing: Annotated[
        bool, typer.Option("--init-if-missing", help="Run `init` first when needed.")
    ] = False,
    worker: Annotated[
        bool,
        typer.Option(help="Run an outbox delivery worker in this process (outbox_worker)."),
    ] = True,
) -> None:
    """Start the API server (default http://127.0.0.1:8080; API docs at /docs)."""
    from trustfleet.kit.cli import read_input_file
    from trustfleet.server.runner import TlsFilePair, check_data_dir
    from trustfleet.server.runner import serve as run_server
    from trustfleet.server.tls import default_names, local_ca_certificate
    from trustfleet.settings import load_settings

    if init_if_missing and not state.settings.initialised:
        init()
    settings = load_settings(state.data_dir, host=host, port=port)
    check_data_dir(settings)  # before anything is written there (--tls-local-ca)
    if (tls_cert is None) != (tls_key is None):
        raise UsageProblem("give both --tls-cert and --tls-key")
    if tls_cert is not None and tls_local_ca:
        raise UsageProblem("give either --tls-cert/--tls-key or --tls-local-ca, not both")
    tls = None
    if tls_cert is not None and tls_key is not None:
        read_input_file(tls_cert, "--tls-cert", probe=True)
        read_input_file(tls_key, "--tls-key", probe=True)
        tls = TlsFilePair(tls_cert, tls_key)
    elif tls_local_ca:
        files = local_ca_certificate(state.context(), default_names(settings.host, tls_name or []))
        tls = TlsFilePair(files.cert, files.key)
        what = "issued" if files.issued else "reused"
        console.print(f"TLS certificate {what} by the local CA: {escape(str(files.cert))}")
    if tls is None and not insecure_http and not _is_loopback(settings.host):
        raise UsageProblem(
            f"refusing plain HTTP on {settings.host}: API tokens would cross the network in"
            " the clear",
            hint="give --tls-local-ca or --tls-cert/--tls-key, or --insecure-http behind a"
            " TLS-terminating proxy",
        )
    scheme = "https" if tls else "http"
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    console.print(f"serving {scheme}://{shown}:{settings.port} (API docs at /docs; Ctrl-C stops)")
    if tls_local_ca:
        console.print(f"clients: --ca-file {escape(str(settings.ca_dir / 'root.pem'))}")
    background = [_start_outbox_worker] if settings.outbox_worker and worker else []
    run_server(settings, tls, background=background)


def _start_outbox_worker(context: AppContext) -> Callable[[], None]:
    from trustfleet.kit.outbox import start_in_thread

    return start_in_thread(_outbox_worker(context)).stop


def _outbox_worker(context: AppContext) -> DeliveryWorker:
    from trustfleet.kit.outbox import DeliveryWorker, parse_schedule

    settings = context.settings
    return DeliveryWorker(
        context.db,
        context.keystore,
        schedule=parse_schedule(settings.outbox_retry_schedule),
        timeout_seconds=settings.outbox_request_timeout,
    )


# =====================================================================================
# Who is calling: login, logout, whoami
# =====================================================================================


def _read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return str(typer.prompt(prompt, hide_input=True)).strip()
    return sys.stdin.readline().strip()


@app.command()
def login(
    token_name: Annotated[
        str | None,
        typer.Option(
            "--create-token",
            help="Instead of reading a token, create one with this name from the local data"
            " directory (on the server's machine).",
        ),
    ] = None,
    role: Annotated[Role, typer.Option(help="Role of the created token.")] = Role.ADMIN,
    ttl: Annotated[
        str | None, typer.Option(help="Lifetime of the created token, e.g. 8h, 30d.")
    ] = None,
) -> None:
    """Keep a token for --server (TRUSTFLEET_ADDR) in your login file (mode 0600). The token
    is read from standard input or a hidden prompt, never from the command line."""
    server = server_required("login", hint="trustfleet login --server https://keys.example:8443")
    if token_name is not None:
        created = state.local_api().post(  # made by the local data directory
            "/v1/tokens", json={"name": token_name, "role": role.value, **_ttl_body(ttl)}
        )
        token = str(created["token"])
    else:
        token = _read_secret(f"API token for {server}")
    if not token:
        raise UsageProblem("no token given on standard input")
    from trustfleet.kit.client import remote_client

    client = remote_client(server, token=token, ca_file=state.ca_file)
    try:
        me = client.get("/v1/whoami")
    finally:
        client.close()
    path = store_token(server, token, name=me["name"], role=me["role"])
    console.print(
        f"logged in to {escape(server)} as {escape(me['name'])} ({me['role']});"
        f" token kept in {escape(str(path))}"
    )


@app.command()
def worker() -> None:
    """Deliver the outbox's messages until interrupted (several may run on PostgreSQL)."""
    import signal
    import threading

    from trustfleet.server.logging import configure_logging

    context = state.context()
    configure_logging(context.settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    delivery = _outbox_worker(context)
    console.print("outbox worker running (Ctrl-C to stop)")
    try:
        delivery.run(stop)
    finally:
        delivery.close()


@app.command()
def logout() -> None:
    """Forget the token kept for --server (TRUSTFLEET_ADDR)."""
    server = server_required("logout")
    forgotten = forget_token(server)
    console.print(f"{'forgot' if forgotten else 'no token kept for'} {escape(server)}")


@app.command()
def whoami() -> None:
    """Who the API sees: the token's name, role and expiry (or the local principal)."""
    me = api().get("/v1/whoami")

    def text() -> None:
        if me["local"]:
            console.print("local principal (the data directory's CLI, actor cli)")
            return
        expiry = f", expires {me['expires_at']}" if me["expires_at"] else ""
        console.print(f"{escape(me['name'])} (role {me['role']}, token {me['token_id']}{expiry})")

    emit(me, text)


# =====================================================================================
# Tokens
# =====================================================================================


def _ttl_body(ttl: str | None) -> dict[str, int]:
    if ttl is None:
        return {}
    text = ttl.strip().lower()
    unit = TTL_UNITS.get(text[-1:]) if text[-1:].isalpha() else 1
    number = text[:-1] if text[-1:].isalpha() else text
    if unit is None or not number.isdigit():
        raise UsageProblem(f"--ttl {ttl!r} is not a duration: write e.g. 3600s, 90m, 8h or 30d")
    return {"ttl_seconds": int(timedelta(seconds=int(number) * unit).total_seconds())}


def _token_table(tokens: list[dict[str, Any]]) -> None:
    table = wrapping_table("id", "name", "role", "created", "expires", "state")
    for t in tokens:
        if t["revoked_at"]:
            status = f"revoked {t['revoked_at'][:19]}"
        else:
            status = "active" if t["active"] else "expired"
        expires = (t["expires_at"] or "never")[:19]
        name = escape(t["name"])
        table.add_row(str(t["id"]), name, t["role"], t["created_at"][:19], expires, status)
    console.print(table)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses it; unique, never reused.")],
    role: Annotated[Role, typer.Option(help="One role (auditor reads, changes nothing).")],
    ttl: Annotated[
        str | None,
        typer.Option(help="Lifetime, e.g. 3600s, 90m, 8h, 30d (default: until revoked)."),
    ] = None,
) -> None:
    """Create a token; its text is printed once."""
    body = {"name": name, "role": role.value, **_ttl_body(ttl)}
    created = api().post("/v1/tokens", json=body)

    def text() -> None:
        expiry = f", expires {created['expires_at']}" if created["expires_at"] else ""
        console.print(
            f"token {created['id']} ({created['role']}) for {escape(created['name'])}{expiry}:"
        )
        console.print(created["token"], soft_wrap=True, highlight=False)

    emit(created, text)


@token_app.command("list")
def token_list() -> None:
    """List tokens (never their text), revoked and expired ones included."""
    tokens = api().get("/v1/tokens")
    emit(tokens, lambda: _token_table(tokens))


def _token_by(name: str | None, token_id: int | None) -> dict[str, Any]:
    if (name is None) == (token_id is None):
        raise UsageProblem("give the token's NAME, or --id")
    if token_id is not None:
        found: dict[str, Any] = api().get(f"/v1/tokens/{token_id}")
        return found
    (one,) = api().get("/v1/tokens", name=name)
    return dict(one)


TokenName = Annotated[str | None, typer.Argument(help="The token's name.", show_default=False)]
TokenId = Annotated[int | None, typer.Option("--id", help="The token's id instead of its name.")]


@token_app.command("show")
def token_show(name: TokenName = None, token_id: TokenId = None) -> None:
    """One token: id, role, creation, expiry, last use (never its text)."""
    token = _token_by(name, token_id)

    def text() -> None:
        table = wrapping_table("field", "value", show_header=False)
        for key in ("id", "name", "role", "created_at", "expires_at", "last_used_at"):
            table.add_row(key, escape(str(token[key] if token[key] is not None else "-")))
        table.add_row("revoked_at", str(token["revoked_at"] or "-"))
        table.add_row("active", "yes" if token["active"] else "no")
        console.print(table)

    emit(token, text)


@token_app.command("revoke")
def token_revoke(name: TokenName = None, token_id: TokenId = None) -> None:
    """Revoke a token at once on every node."""
    token = _token_by(name, token_id)
    revoked = api().delete(f"/v1/tokens/{token['id']}")
    emit(
        revoked, lambda: console.print(f"token {revoked['id']} ({escape(revoked['name'])}) revoked")
    )


# =====================================================================================
# Audit log
# =====================================================================================


DeviceFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--device",
        help="An audit device file (JSON Lines, or a syslog collector's file of them) to "
        "compare the database with; repeat for each node's file.",
        show_default=False,
    ),
]


@audit_app.command("verify")
def audit_verify(device: DeviceFiles = None) -> None:
    """Check the audit log: the hash chain, the signed checkpoints, and the audit devices
    (the server's own file device, and every --device file). Prints one line per problem
    naming the record; exits 1 if there is any."""
    client = api()
    report = client.get("/v1/audit/verify")
    if device:
        report = _with_devices(client, report, device)

    def text() -> None:
        if report["ok"]:
            devices = f", {len(report['devices'])} device(s) agree" if report["devices"] else ""
            console.print(
                f"audit log OK: {report['records']} records, chain intact, "
                f"{report['checkpoints']} signed checkpoint(s){devices}"
            )
            return
        for problem in report["problems"]:
            where = f"record {problem['seq']}: " if problem["seq"] else ""  # 0: a device
            err_console.print(f"{where}{problem['problem']}", highlight=False)
        err_console.print(f"audit log TAMPERED: {len(report['problems'])} problem(s)")

    emit(report, text)
    if not report["ok"]:
        raise typer.Exit(EXIT_REFUSED)


def _with_devices(client: Any, report: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """``report`` with what the database and the device ``files`` disagree on: the
    records and checkpoints are read through the API, the files here."""
    from types import SimpleNamespace

    from trustfleet.store.audit_devices import compare, read_device_file

    logs = []
    for path in files:
        try:
            logs.append(read_device_file(path))
        except OSError as exc:
            raise UsageProblem(f"cannot read the audit device {path}: {exc.strerror}") from None
    records, cursor = [], None
    while True:
        page = client.get("/v1/audit", limit=1000, cursor=cursor)
        records += [SimpleNamespace(seq=r["seq"], hash=r["hash"]) for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    checkpoints = [SimpleNamespace(**c) for c in client.get("/v1/audit/checkpoints")]
    found = compare(records, checkpoints, logs, complete=True)
    problems = list(report["problems"])
    seen = {(p["seq"], p["problem"]) for p in problems}
    problems += [
        {"seq": p.seq, "problem": p.problem} for p in found if (p.seq, p.problem) not in seen
    ]
    problems.sort(key=lambda p: int(p["seq"]))
    devices = list(dict.fromkeys([*report.get("devices", []), *(log.name for log in logs)]))
    return {**report, "ok": not problems, "problems": problems, "devices": devices}


@audit_app.command("list")
def audit_list(
    action: Annotated[
        str | None, typer.Option(help="Only this action, or a prefix ending in *: 'tmk.*'.")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only records of this actor.")] = None,
    since: Annotated[
        str | None, typer.Option(help="At or after this time (ISO 8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Records per page.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="The next page's cursor.")] = None,
) -> None:
    """Read the audit log, oldest first, one page at a time."""
    page = api().get(
        "/v1/audit",
        action=action,
        actor=actor,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )

    def text() -> None:
        for record in page["items"]:  # one line each, like a log: nothing is cut
            at = record["at"][:19].replace("T", " ")
            line = (
                f"{record['seq']:>6} {at} {record['outcome']:<7} {record['action']}"
                f"  {record['actor']}  {record['subject']}"
            )
            console.print(escape(line), soft_wrap=True, highlight=False)
        if page["next_cursor"]:
            err_console.print(f"more: --cursor {page['next_cursor']}", highlight=False)

    emit(page, text)


def _register_domain_commands() -> None:
    from trustfleet.binding import cli as binding_cli
    from trustfleet.cli import ca as pki_cli
    from trustfleet.cli import demo
    from trustfleet.cli import keystore as keystore_cli
    from trustfleet.keysync import cli as keysync_cli
    from trustfleet.kit.outbox import cli as outbox_cli
    from trustfleet.tmk import cli as tmk_cli

    app.add_typer(pki_cli.app, name="ca")
    app.add_typer(keystore_cli.app, name="keystore")
    app.add_typer(tmk_cli.app, name="tmk")
    app.add_typer(binding_cli.app, name="se")
    app.add_typer(keysync_cli.app, name="keysync")
    app.add_typer(outbox_cli.app, name="outbox")
    app.add_typer(keysync_cli.receiver_app, name="platform-receiver")
    emulate_app.add_typer(tmk_cli.pos_app, name="pos")
    emulate_app.add_typer(keysync_cli.m2m_app, name="m2m")
    for step in (tmk_cli.demo_step, binding_cli.demo_step, keysync_cli.demo_step):
        if step not in demo.DEMO_STEPS:
            demo.DEMO_STEPS.append(step)
    app.command("demo")(demo.demo)


_register_domain_commands()


def main() -> None:
    """Entry point: every error is one line ``error [code]: message``; the exit status says
    what kind (README: exit codes)."""
    sys.exit(run(app))
