"""``trustfleet outbox``: delivery status, redelivery, pause and resume, as a client of the
server's API (``TRUSTFLEET_ADDR``, ``TRUSTFLEET_TOKEN`` of an admin or operator)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from trustfleet.kit.cli import console
from trustfleet.kit.remote import api_client, checked

app = typer.Typer(no_args_is_help=True, help="The outbox: webhook deliveries and their status.")

Server = Annotated[
    str | None, typer.Option("--server", help="Server URL (default $TRUSTFLEET_ADDR).")
]
Output = Annotated[str, typer.Option("--output", "-o", help="table or json.")]


def _emit(data: Any, output: str, table: Table) -> None:
    if output == "json":
        console.print_json(json.dumps(data))
    else:
        console.print(table)


@app.command("list")
def list_messages(
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    server: Server = None,
    output: Output = "table",
) -> None:
    """Messages, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if destination:
        params["destination"] = destination
    with api_client(server) as client:
        rows = checked(client.get("/v1/outbox/messages", params=params))
    table = Table("id", "destination", "status", "attempts", "last error", "created")
    for row in rows:
        table.add_row(
            row["id"], escape(row["destination"]), row["status"], str(row["attempts"]),
            escape(row["last_error"] or ""), row["created_at"],
        )  # fmt: skip
    _emit(rows, output, table)


@app.command("show")
def show(message_id: str, server: Server = None, output: Output = "table") -> None:
    """One message's delivery status."""
    with api_client(server) as client:
        row = checked(client.get(f"/v1/outbox/messages/{message_id}"))
    table = Table("field", "value", show_header=False)
    for key, value in row.items():
        table.add_row(key, escape(str(value)))
    _emit(row, output, table)


@app.command("redeliver")
def redeliver(message_id: str, server: Server = None) -> None:
    """Send a delivered or dead message again (same webhook-id)."""
    with api_client(server) as client:
        row = checked(client.post(f"/v1/outbox/messages/{message_id}/redeliver"))
    console.print(f"{row['id']}: {row['status']}, due now")


@app.command("destinations")
def destinations(server: Server = None, output: Output = "table") -> None:
    """Destinations with their pending, delivered and dead counts."""
    with api_client(server) as client:
        rows = checked(client.get("/v1/outbox/destinations"))
    table = Table("name", "url", "signing", "paused", "pending", "delivered", "dead")
    for row in rows:
        table.add_row(
            escape(row["name"]), escape(row["url"]), row["signing"], str(row["paused"]),
            str(row["pending"]), str(row["delivered"]), str(row["dead"]),
        )  # fmt: skip
    _emit(rows, output, table)


@app.command("pause")
def pause(name: str, server: Server = None) -> None:
    """No deliveries to this destination until resumed."""
    with api_client(server) as client:
        row = checked(client.post(f"/v1/outbox/destinations/{name}/pause"))
    console.print(f"{escape(row['name'])}: paused, {row['pending']} pending")


@app.command("resume")
def resume(name: str, server: Server = None) -> None:
    """Deliveries to this destination start again."""
    with api_client(server) as client:
        row = checked(client.post(f"/v1/outbox/destinations/{name}/resume"))
    console.print(f"{escape(row['name'])}: resumed, {row['pending']} pending")
