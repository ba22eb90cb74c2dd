"""``trustfleet keystore``: list keys, rotate the master key."""

from __future__ import annotations

import typer
from rich.table import Table

from trustfleet.kit.cli import console, state

app = typer.Typer(no_args_is_help=True, help="The key store (never shows key material).")


@app.command("list")
def list_keys() -> None:
    """List stored keys: handle, algorithm, usage, exportability."""
    table = Table("handle", "algorithm", "usage", "exportable", "label", "created")
    for key in state.context().keystore.list():
        usage = "|".join(flag.name or "" for flag in type(key.usage) if flag in key.usage and flag)
        table.add_row(
            key.handle,
            key.algorithm.value,
            usage,
            "yes" if key.exportable else "no",
            key.label,
            key.created_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@app.command("rotate-master")
def rotate_master() -> None:
    """Re-wrap every soft-store key under a new master key; safe to re-run after a crash."""
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
