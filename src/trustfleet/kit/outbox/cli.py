"""``trustfleet outbox``: delivery status, redelivery, pause and resume, as a client of the
API (``--server`` with an admin or operator token, or the local data directory)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from trustfleet.kit.cli import checked, console, emit, http_api, wrapping_table

app = typer.Typer(no_args_is_help=True, help="The outbox: webhook deliveries and their status.")


@app.command("list")
def list_messages(
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
) -> None:
    """Messages, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if destination:
        params["destination"] = destination
    client = http_api()
    rows = checked(client.get("/v1/outbox/messages", params=params))
    table = wrapping_table("id", "destination", "status", "attempts", "last error", "created")
    for row in rows:
        table.add_row(
            row["id"], escape(row["destination"]), row["status"], str(row["attempts"]),
            escape(row["last_error"] or ""), row["created_at"],
        )  # fmt: skip
    emit(rows, lambda: console.print(table))


@app.command("show")
def show(message_id: str) -> None:
    """One message's delivery status."""
    client = http_api()
    row = checked(client.get(f"/v1/outbox/messages/{message_id}"))
    table = wrapping_table("field", "value", show_header=False)
    for key, value in row.items():
        table.add_row(key, escape(str(value)))
    emit(row, lambda: console.print(table))


@app.command("redeliver")
def redeliver(message_id: str) -> None:
    """Send a delivered or dead message again (same webhook-id)."""
    client = http_api()
    row = checked(client.post(f"/v1/outbox/messages/{message_id}/redeliver"))
    console.print(f"{row['id']}: {row['status']}, due now")


@app.command("destinations")
def destinations() -> None:
    """Destinations with their pending, delivered and dead counts."""
    client = http_api()
    rows = checked(client.get("/v1/outbox/destinations"))
    table = wrapping_table("name", "url", "signing", "paused", "pending", "delivered", "dead")
    for row in rows:
        table.add_row(
            escape(row["name"]), escape(row["url"]), row["signing"], str(row["paused"]),
            str(row["pending"]), str(row["delivered"]), str(row["dead"]),
        )  # fmt: skip
    emit(rows, lambda: console.print(table))


@app.command("pause")
def pause(name: str) -> None:
    """No deliveries to this destination until resumed."""
    client = http_api()
    row = checked(client.post(f"/v1/outbox/destinations/{name}/pause"))
    console.print(f"{escape(row['name'])}: paused, {row['pending']} pending")


@app.command("resume")
def resume(name: str) -> None:
    """Deliveries to this destination start again."""
    client = http_api()
    row = checked(client.post(f"/v1/outbox/destinations/{name}/resume"))
    console.print(f"{escape(row['name'])}: resumed, {row['pending']} pending")
