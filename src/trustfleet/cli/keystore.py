"""trustfleet keystore: its status and keys (through the API); master-key rotation (local)."""

from __future__ import annotations

import typer

from trustfleet.kit.cli import api, console, emit, state, wrapping_table

app = typer.Typer(no_args_is_help=True, help="The key store (never shows key material).")


@app.command("status")
def status() -> None:
    """Which backend serves keys, whether it answers, how many keys it holds."""
    answer = api().get("/v1/keystore")

    def text() -> None:
        if answer["reachable"]:
            console.print(f"{answer['backend']} key store: reachable, {answer['keys']} keys")
        else:
            console.print(f"{answer['backend']} key store: NOT reachable: {answer['problem']}")

    emit(answer, text)


@app.command("list")
def list_keys() -> None:
    """List stored keys: handle, algorithm, usage, exportability."""
    keys = api().get("/v1/keystore/keys")

    def text() -> None:
        table = wrapping_table("handle", "algorithm", "usage", "exportable", "label", "created")
        for key in keys:
            table.add_row(
                key["handle"],
                key["algorithm"],
                "|".join(key["usage"]),
                "yes" if key["exportable"] else "no",
                key["label"],
                key["created_at"][:19],
            )
        console.print(table)

    emit(keys, text)


@app.command("rotate-master")
def rotate_master() -> None:
    """Re-wrap every soft-store key under a new master key; safe to re-run after a crash.
    Local only: it needs the data directory's master key file."""
    from trustfleet.keystore.master import rotate_master_key

    context = state.context()
    report = rotate_master_key(context.db, context.settings.resolved_master_key_file)
    with context.db.work() as work:
        work.audit(
            "keystore.master_rotated",
            actor="cli",
            subject=f"kek:{report.kek_id}",
            details={"rewrapped": report.rewrapped},
        )
    console.print(f"re-wrapped {report.rewrapped} keys; active master key {report.kek_id}")
