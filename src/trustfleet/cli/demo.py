"""``trustfleet demo``: the platform end to end in a throwaway data directory, over the real
HTTP API (in process). Each capability adds a step to :data:`DEMO_STEPS`."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import load_der_x509_crl

with warnings.catch_warnings():  # starlette's notice about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from trustfleet.bootstrap import initialise
from trustfleet.kit.cli import console
from trustfleet.kit.demo import DemoEnv, DemoFailed, step_title
from trustfleet.server.app import create_app
from trustfleet.server.runner import build_context
from trustfleet.settings import load_settings


def spine_step(env: DemoEnv) -> None:
    step_title("spine: tokens, certificates, CRL, audit")
    created = env.call("POST", "/v1/tokens", json={"name": "demo operator", "role": "operator"})
    console.print(f"operator token #{created['id']} created (role {created['role']})")
    try:
        env.call("POST", "/v1/tokens", token=created["token"], json={"name": "x", "role": "admin"})
    except DemoFailed as refused:
        console.print(f"the operator may not create tokens: {refused.message}")
    device_key = ec.generate_private_key(ec.SECP256R1())
    pem = device_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    issued = env.call(
        "POST",
        "/v1/ca/trustfleet-issuing/issue",
        json={"kind": "device", "device_id": "demo-device-1", "public_key_pem": pem.decode()},
    )
    console.print(f"device certificate {issued['serial'][:16]}… issued")
    leaf = env.workdir / "device.pem"
    leaf.write_text(issued["certificate_pem"])
    _openssl_verify(env, leaf, crl=None)
    env.call("POST", "/v1/ca/revoke", json={"serial": issued["serial"], "reason": "key_compromise"})
    crl = env.client.get("/v1/ca/trustfleet-issuing/crl")
    crl_der = env.workdir / "issuing.crl"
    crl_der.write_bytes(crl.content)
    console.print(f"revoked; public CRL is {len(crl.content)} bytes")
    _openssl_verify(env, leaf, crl=crl_der)
    verified = env.call("GET", "/v1/audit/verify")
    console.print(f"audit chain: ok={verified['ok']}, {verified['records']} records")


def _openssl_verify(env: DemoEnv, leaf: Path, crl: Path | None) -> None:
    """Show that stock OpenSSL accepts the chain (and, given the CRL, refuses a revoked leaf)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        console.print("(openssl not installed: skipping its check)")
        return
    ca_dir = env.context.settings.ca_dir
    command = [openssl, "verify", "-CAfile", str(ca_dir / "root.pem")]
    command += ["-untrusted", str(ca_dir / "intermediate.pem")]
    if crl is not None:
        crl_pem = crl.with_suffix(".crl.pem")
        crl_pem.write_bytes(load_der_x509_crl(crl.read_bytes()).public_bytes(Encoding.PEM))
        command += ["-crl_check", "-CRLfile", str(crl_pem)]
    result = subprocess.run([*command, str(leaf)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).strip().splitlines()
    reasons = [line.split("lookup:")[-1].strip() for line in lines if "lookup:" in line]
    verdict = reasons[0] if reasons else (lines[-1] if lines else f"exit {result.returncode}")
    console.print(f"openssl verify{' -crl_check' if crl else ''}: {verdict}")


DEMO_STEPS: list[Callable[[DemoEnv], None]] = [spine_step]


def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's data directory.")] = False,
) -> None:
    """Run every capability's flow end to end in a throwaway data directory."""
    workdir = Path(tempfile.mkdtemp(prefix="trustfleet-demo-"))
    try:
        settings = load_settings(workdir / "data")
        result = initialise(settings)
        assert result.admin_token is not None
        context = build_context(settings)
        with TestClient(create_app(context)) as client:
            env = DemoEnv(context, client, result.admin_token, workdir)
            for step in DEMO_STEPS:
                step(env)
        console.rule("[bold green]demo complete")
    finally:
        if keep:
            console.print(f"data directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
