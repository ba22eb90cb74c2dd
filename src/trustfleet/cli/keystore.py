"""``trustfleet keystore``: its status and keys, where each lives (through the API); master-key
rotation and moving a soft store under a PKCS#11 token (local: they need the data directory)."""

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
    """List stored keys: handle, algorithm, usage, where each lives (token, sealed under
    the token, or database under the master key), whether it can leave, and which of its
    operations run inside the token."""
    answer = api().get("/v1/keystore/keys")

    def text() -> None:
        table = wrapping_table(
            "handle",
            "algorithm",
            "usage",
            "custody",
            "extractable",
            "in token",
            "in process",
            "label",
            "created",
        )
        for key in answer["keys"]:
            table.add_row(
                key["handle"],
                key["algorithm"],
                "|".join(key["usage"]),
                key["custody"],
                "yes" if key["extractable"] else "no",
                ", ".join(key["token_operations"]) or "-",
                ", ".join(key["process_operations"]) or "-",
                key["label"],
                key["created_at"][:19],
            )
        console.print(table)

    emit(answer, text)


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


@app.command("seal")
def seal(
    keep_master_key: bool = typer.Option(
        False, help="Leave the master key file in place once every key is sealed."
    ),
) -> None:
    """Move every key of a soft store under the PKCS#11 token (keystore_backend = "pkcs11"):
    each key is re-wrapped under the token's key encryption key, then the master key file
    is removed. Handles do not change. Safe to re-run after a crash."""
    from trustfleet.errors import ConfigurationError
    from trustfleet.keystore.hsm import HsmKeyStore, seal_soft_store

    context = state.context()
    if not isinstance(context.keystore, HsmKeyStore):
        raise ConfigurationError(
            'keystore seal needs keystore_backend = "pkcs11" and the token settings'
            " (docs/configuration.md); the master key file is read to open the soft keys"
        )
    report = seal_soft_store(
        context.db,
        context.keystore,
        context.settings.resolved_master_key_file,
        remove_master_key=not keep_master_key,
    )
    with context.db.work() as work:
        work.audit(
            "keystore.sealed",
            actor="cli",
            subject=f"kek:{report.kek_id}",
            details={"sealed": report.sealed, "master_key_removed": report.master_key_removed},
        )
    removed = "; master key file removed" if report.master_key_removed else ""
    console.print(f"sealed {report.sealed} keys under token key {report.kek_id}{removed}")
