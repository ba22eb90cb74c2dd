"""``trustfleet ca``: show the CAs, issue and revoke certificates, write a CRL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_der_x509_crl
from rich.table import Table

from trustfleet.errors import InvalidInput
from trustfleet.kit.cli import console, state
from trustfleet.pki.service import LOCAL_ISSUING_CA, PkiService

app = typer.Typer(no_args_is_help=True, help="The local certificate authorities.")


def _service() -> PkiService:
    context = state.context()
    return PkiService(context.db, context.keystore)


@app.command("show")
def show(
    name: Annotated[str | None, typer.Argument(help="One CA by name; default: all.")] = None,
    pem: Annotated[bool, typer.Option("--pem", help="Print the certificates as PEM.")] = False,
) -> None:
    """List the CAs (name, parent, algorithm, subject, validity)."""
    service = _service()
    cas = [service.get_ca(name)] if name else service.list_cas()
    table = Table("name", "parent", "algorithm", "serial", "not after")
    for ca in cas:
        cert = ca.certificate
        table.add_row(
            ca.name,
            ca.parent or "-",
            ca.algorithm.value,
            ca.serial_hex[:16] + "…",
            cert.not_valid_after_utc.date().isoformat(),
        )
    console.print(table)
    if pem:
        for ca in cas:
            console.print(ca.pem, highlight=False, soft_wrap=True)


@app.command("issue")
def issue(
    kind: Annotated[str, typer.Option(help="server or device")],
    out: Annotated[Path, typer.Option(help="Where to write the certificate (PEM).")],
    csr: Annotated[Path | None, typer.Option(help="A PKCS#10 CSR (PEM or DER).")] = None,
    public_key: Annotated[Path | None, typer.Option(help="A public key (PEM).")] = None,
    dns: Annotated[list[str] | None, typer.Option(help="DNS name (server; repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="IP address (server; repeatable).")] = None,
    device_id: Annotated[str | None, typer.Option(help="Device identifier (device).")] = None,
    ca: Annotated[str, typer.Option(help="Issuing CA.")] = LOCAL_ISSUING_CA,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Issue a server or device certificate from a CSR or a public key."""
    key_source = {
        "csr": csr.read_bytes() if csr else None,
        "public_key": public_key.read_bytes() if public_key else None,
    }
    service = _service()
    if kind == "server":
        info = service.issue_server_certificate(
            ca,
            dns_names=dns or [],
            ips=ip or [],
            validity=timedelta(days=days),
            actor="cli",
            **key_source,
        )
    elif kind == "device":
        if not device_id:
            raise InvalidInput("--device-id is required for a device certificate")
        info = service.issue_device_certificate(
            ca, device_id, validity=timedelta(days=days), actor="cli", **key_source
        )
    else:
        raise InvalidInput("--kind must be server or device")
    out.write_text(info.pem)
    console.print(f"issued {info.kind} certificate {info.serial_hex} -> {out}")


@app.command("revoke")
def revoke(
    serial: Annotated[str, typer.Argument(help="Serial number (hex).")],
    reason: Annotated[
        str, typer.Option(help="RFC 5280 reason, e.g. key_compromise, superseded.")
    ] = "unspecified",
) -> None:
    """Revoke a certificate; the next CRL lists it."""
    info = _service().revoke(serial, reason, actor="cli")
    console.print(f"revoked {info.serial_hex} ({reason})")


@app.command("crl")
def crl(
    out: Annotated[Path, typer.Option(help="Where to write the CRL (PEM).")],
    ca: Annotated[str, typer.Option(help="Issuing CA.")] = LOCAL_ISSUING_CA,
) -> None:
    """Write the CA's current CRL."""
    der = _service().crl(ca, actor="cli")
    out.write_bytes(load_der_x509_crl(der).public_bytes(Encoding.PEM))
    console.print(f"CRL of {ca} -> {out}")
