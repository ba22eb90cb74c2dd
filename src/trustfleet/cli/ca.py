"""trustfleet ca: show the CAs, issue and revoke certificates, write a CRL (through the API)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_der_x509_crl, load_der_x509_csr
from rich.markup import escape

from trustfleet.kit.cli import UsageProblem, api, console, emit, read_input_file
from trustfleet.pki.errors import CaNotFound
from trustfleet.pki.service import LOCAL_ISSUING_CA
from trustfleet.pki.x509 import RevocationReason

app = typer.Typer(no_args_is_help=True, help="The certificate authorities.")


class Kind(StrEnum):
    SERVER = "server"
    DEVICE = "device"


def _print_cas(cas: list[dict[str, Any]]) -> None:
    """One block per CA, so that no name, subject or serial is ever cut to fit a table."""
    for ca in cas:
        under = f", under {ca['parent']}" if ca["parent"] else ", a root"
        if ca.get("restricted"):
            under += ", restricted: issues only its owner's certificates"
        console.print(f"[bold]{escape(ca['name'])}[/bold] ({ca['algorithm']}{escape(under)})")
        console.print(f"  subject  {escape(ca['subject'])}", soft_wrap=True, highlight=False)
        console.print(f"  serial   {ca['serial']}", soft_wrap=True, highlight=False)
        console.print(f"  valid    {ca['not_before'][:10]} .. {ca['not_after'][:10]}")


@app.command("show")
def show(
    name: Annotated[str | None, typer.Argument(help="One CA by name; default: all.")] = None,
    pem: Annotated[bool, typer.Option("--pem", help="Print the certificates as PEM.")] = False,
) -> None:
    """List the CAs: name, parent, algorithm, subject, serial and validity."""
    cas = api().get("/v1/ca")
    if name is not None:
        cas = [ca for ca in cas if ca["name"] == name]
        if not cas:
            raise CaNotFound(f"no CA is named {name!r}", hint="`trustfleet ca show` lists them")

    def text() -> None:
        _print_cas(cas)
        if pem:
            for ca in cas:
                console.print(ca["certificate_pem"], highlight=False, soft_wrap=True)

    emit(cas, text)


def _pem_of(path: Path, what: str) -> str:
    data = read_input_file(path, what)
    if data.lstrip().startswith(b"-----BEGIN"):
        return data.decode("ascii", errors="replace")
    if what == "--csr":
        try:
            return load_der_x509_csr(data).public_bytes(Encoding.PEM).decode()
        except ValueError:
            raise UsageProblem(f"--csr {path} is neither a PEM nor a DER CSR") from None
    raise UsageProblem(f"{what} {path} is not PEM")


@app.command("issue")
def issue(
    kind: Annotated[Kind, typer.Option(help="What the certificate is for.")],
    out: Annotated[Path, typer.Option(help="Where to write the certificate (PEM).")],
    csr: Annotated[Path | None, typer.Option(help="A PKCS#10 CSR (PEM or DER).")] = None,
    public_key: Annotated[Path | None, typer.Option(help="A public key (PEM).")] = None,
    dns: Annotated[list[str] | None, typer.Option(help="DNS name (server; repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="IP address (server; repeatable).")] = None,
    device_id: Annotated[str | None, typer.Option(help="Device identifier (device).")] = None,
    ca: Annotated[str, typer.Option(help="Issuing CA.")] = LOCAL_ISSUING_CA,
    days: Annotated[int | None, typer.Option(help="Validity in days.", min=1)] = None,
) -> None:
    """Issue a server or device certificate from a CSR or a public key."""
    if (csr is None) == (public_key is None):
        raise UsageProblem("give exactly one of --csr and --public-key")
    body: dict[str, Any] = {"kind": kind.value, "dns_names": dns or [], "ips": ip or []}
    if csr is not None:
        body["csr_pem"] = _pem_of(csr, "--csr")
    if public_key is not None:
        body["public_key_pem"] = _pem_of(public_key, "--public-key")
    if device_id is not None:
        body["device_id"] = device_id
    if days is not None:
        body["validity_days"] = days
    issued = api().post(f"/v1/ca/{ca}/issue", json=body)
    out.write_text(issued["certificate_pem"])
    emit(
        issued,
        lambda: console.print(
            f"issued {issued['kind']} certificate {issued['serial']} -> {escape(str(out))}"
        ),
    )


@app.command("revoke")
def revoke(
    serial: Annotated[str, typer.Argument(help="Serial number (hex).")],
    reason: Annotated[
        RevocationReason, typer.Option(help="RFC 5280 reason.")
    ] = RevocationReason.UNSPECIFIED,
) -> None:
    """Revoke a certificate; the next CRL lists it."""
    revoked = api().post("/v1/ca/revoke", json={"serial": serial, "reason": reason.value})
    emit(revoked, lambda: console.print(f"revoked {revoked['serial']} ({reason.value})"))


@app.command("crl")
def crl(
    out: Annotated[Path, typer.Option(help="Where to write the CRL (PEM).")],
    ca: Annotated[str, typer.Option(help="Issuing CA.")] = LOCAL_ISSUING_CA,
) -> None:
    """Write the CA's current CRL."""
    der = api(token_required=False).get_bytes(f"/v1/ca/{ca}/crl")
    out.write_bytes(load_der_x509_crl(der).public_bytes(Encoding.PEM))
    console.print(f"CRL of {escape(ca)} -> {escape(str(out))}")
