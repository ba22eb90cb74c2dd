"""TLS for ``trustfleet serve``: the one-flag server certificate from the local CA.

``serve --tls-local-ca`` issues a TLS server certificate from the data directory's issuing
CA (``trustfleet-issuing``, under ``trustfleet-root``) for the names and addresses clients
use, and serves with it. Its private key is the TLS key of the server process: it is made
here, written to ``<data dir>/tls/server.key`` with mode 0600, and never enters the key store
(uvicorn reads it from the file, as it would any operator-provided key). The certificate file
holds the leaf and the issuing CA, so a client that trusts ``<data dir>/ca/root.pem``
(``--ca-file``) verifies the server. An existing certificate is reused while it covers the
names and has more than :data:`RENEW_BEFORE` left.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from trustfleet.pki.service import LOCAL_ISSUING_CA, SERVER_VALIDITY, PkiService
from trustfleet.server.context import AppContext
from trustfleet.store.files import atomic_write, make_private_directory

TLS_DIR = "tls"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
RENEW_BEFORE = timedelta(days=30)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names, not a bind


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    issued: bool  # False when an existing certificate was reused


def default_names(host: str, extra: Iterable[str] = ()) -> list[str]:
    """What a local-CA certificate covers: the bound host (unless a wildcard), the loopback
    names, this machine's host name, and ``extra``; duplicates removed, order kept."""
    names = [host] if host not in WILDCARD_HOSTS else []
    names += ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))


def _split(names: Sequence[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


def _covers(cert: x509.Certificate, dns: Sequence[str], ips: Sequence[str], now: datetime) -> bool:
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return set(dns) <= have_dns and set(ips) <= have_ips


def _reusable(
    cert_path: Path, key_path: Path, dns: Sequence[str], ips: Sequence[str], now: datetime
) -> bool:
    """The files hold a certificate covering the names, valid long enough, and its key (a
    crash between the two writes leaves a pair that does not match: issue again)."""
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, IndexError):
        return False
    spki = PublicFormat.SubjectPublicKeyInfo
    same_key = key.public_key().public_bytes(Encoding.DER, spki) == cert.public_key().public_bytes(
        Encoding.DER, spki
    )
    return same_key and _covers(cert, dns, ips, now)


def local_ca_certificate(context: AppContext, names: Sequence[str]) -> TlsFiles:
    """The server certificate and key files for ``names``, issued by the local CA if the
    existing ones do not cover them (see the module docstring)."""
    directory = context.settings.data_dir / TLS_DIR
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    dns, ips = _split(names)
    now = datetime.now(UTC)
    if cert_path.is_file() and key_path.is_file() and _reusable(cert_path, key_path, dns, ips, now):
        return TlsFiles(cert_path, key_path, issued=False)
    make_private_directory(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    pki = PkiService(context.db, context.keystore)
    issued = pki.issue_server_certificate(
        LOCAL_ISSUING_CA,
        public_key=public_pem,
        dns_names=dns,
        ips=ips,
        validity=SERVER_VALIDITY,
        actor="cli",
    )
    chain = [ca.pem for ca in pki.ca_chain(LOCAL_ISSUING_CA) if ca.parent is not None]
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, "".join([issued.pem, *chain]).encode(), mode=0o600)
    return TlsFiles(cert_path, key_path, issued=True)
