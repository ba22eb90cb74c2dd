"""``trustfleet``: init, serve, tokens, audit, CA, key store and the demo."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trustfleet.errors import TrustfleetError
from trustfleet.kit.cli import console, err_console, state

if TYPE_CHECKING:
    from trustfleet.kit.outbox import DeliveryWorker
    from trustfleet.server.context import AppContext

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
token_app = typer.Typer(no_args_is_help=True, help="API tokens (one role each).")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
emulate_app = typer.Typer(no_args_is_help=True, help="Reference devices (emulators).")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(emulate_app, name="emulate")


@app.callback()
def _global(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="TRUSTFLEET_DATA_DIR",
            help="Data directory (default: the user's data directory).",
        ),
    ] = None,
) -> None:
    state.data_dir = data_dir


@app.command()
def init() -> None:
    """Create the data directory: master key, database, local CA and an admin token."""
    from trustfleet.bootstrap import initialise

    result = initialise(state.settings)
    console.print(f"data directory: {result.data_dir}")
    if result.admin_token is None:
        console.print("already initialised; nothing changed")
        return
    console.print(f"local root CA: {result.root_ca_pem_path}")
    console.print("admin API token (shown once, store it now):")
    console.print(result.admin_token, soft_wrap=True, highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    init_if_missing: Annotated[
        bool, typer.Option("--init-if-missing", help="Run `init` first when needed.")
    ] = False,
    worker: Annotated[
        bool,
        typer.Option(help="Run an outbox delivery worker in this process (outbox_worker)."),
    ] = True,
) -> None:
    """Start the API server (default 127.0.0.1:8080)."""
    from trustfleet.bootstrap import is_initialised
    from trustfleet.server.runner import serve as run_server
    from trustfleet.settings import load_settings

    if init_if_missing and not is_initialised(state.settings):
        init()
    settings = load_settings(state.data_dir, host=host, port=port)
    background = [_start_outbox_worker] if settings.outbox_worker and worker else []
    run_server(settings, background=background)


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


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses the token.")],
    role: Annotated[str, typer.Option(help="One role: admin, manufacturer, operator, ...")],
) -> None:
    """Create a token; its text is printed once."""
    from trustfleet.server.auth import create_token

    plaintext, info = create_token(state.context().db, name=name, role=role, actor="cli")
    console.print(f"token {info.id} ({info.role}) for {info.name}:")
    console.print(plaintext, soft_wrap=True, highlight=False)


@token_app.command("list")
def token_list() -> None:
    """List tokens (never their text)."""
    from trustfleet.server.auth import list_tokens

    table = Table("id", "name", "role", "created", "revoked")
    for t in list_tokens(state.context().db):
        revoked = t.revoked_at.isoformat() if t.revoked_at else ""
        table.add_row(str(t.id), t.name, t.role, t.created_at.isoformat(), revoked)
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="Token id from `token list`.")],
) -> None:
    """Revoke a token at once on every node."""
    from trustfleet.server.auth import revoke_token

    revoke_token(state.context().db, token_id, actor="cli")
    console.print(f"token {token_id} revoked")


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit chain; exit 1 if any record was edited, deleted or reordered."""
    from trustfleet.store.audit import all_records, verify_chain

    with state.context().db.reading() as reads:
        report = verify_chain(all_records(reads))
    if report.ok:
        console.print(f"audit log OK: {report.records} records, chain intact")
        return
    for problem in report.problems:
        err_console.print(f"record {problem.seq}: {problem.problem}")
    err_console.print(f"audit log TAMPERED: {len(report.problems)} problem(s)")
    raise typer.Exit(1)


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
    """Entry point: usage errors exit 2 (click), trustfleet errors print their code and exit 1."""
    try:
        app()
    except TrustfleetError as exc:
        err_console.print(escape(f"error [{exc.code}]: {exc.message}"))
        sys.exit(1)
