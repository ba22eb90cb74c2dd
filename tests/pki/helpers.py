"""Helpers shared by the PKI tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustfleet.pki.service import CaInfo

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Hierarchy:
    root: CaInfo
    issuing: CaInfo


def ec_public_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def crl_pem(der: bytes) -> str:
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM).decode()


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def flip_signature_byte(der: bytes) -> bytes:
    """The certificate with one byte of its signature value changed."""
    cert = x509.load_der_x509_certificate(der)
    position = der.rindex(cert.signature) + len(cert.signature) // 2
    return der[:position] + bytes([der[position] ^ 0x01]) + der[position + 1 :]


def der_to_pem(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode()
