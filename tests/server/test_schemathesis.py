"""schemathesis against a live server, once per role: no 5xx, no answer the OpenAPI
document does not declare (status, media type, body schema, headers), wrong-shape input
refused, ``OPTIONS``/405 listing the path's methods.

Each role's token tests the operations that role is admitted to (``x-roles``); the public
operations are tested without a token. Bounded: a fixed seed, a few examples per operation,
no stateful phase. On SQLite, and on PostgreSQL too when the suite has one. The figures of
a run are in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import (
    admin_token_for,
    needs_postgres,
    node_environment,
    postgres_schema,
    start_node,
    stop,
    wait_ready,
)
from trustfleet.server.models import Role
from trustfleet.tmk.identity import KSRCRT_CA

pytestmark = pytest.mark.slow

SEED = 20261206
MAX_EXAMPLES = int(os.environ.get("TRUSTFLEET_SCHEMATHESIS_EXAMPLES", "15"))
PHASES = os.environ.get("TRUSTFLEET_SCHEMATHESIS_PHASES", "examples,coverage,fuzzing")
#: positive_data_acceptance expects 2xx for valid input, but generated identifiers name
#: nothing (404) and generated keys and signatures do not verify (400): not a defect
EXCLUDED_CHECKS = "positive_data_acceptance"
#: the admin role last: it may revoke tokens (``DELETE /v1/tokens/{id}``) of the others
ROLE_ORDER = [role.value for role in Role if role is not Role.ADMIN] + [Role.ADMIN.value]
ANONYMOUS = "anonymous"
TERMINAL = "st-terminal-1"
PLATFORM = "st-app"
GATEWAY = "st-gw"
MDN = "+861440000000001"


def schemathesis_command() -> list[str]:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        # CI must run it: a missing schemathesis fails, never skips
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return [found]


def operations_by_caller(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Operation ids by the role that may call them (``anonymous``: the public ones)."""
    callers: dict[str, list[str]] = {}
    for path_item in spec["paths"].values():
        for operation in path_item.values():
            for caller in operation.get("x-roles", [ANONYMOUS]):
                callers.setdefault(caller, []).append(operation["operationId"])
    return callers


#: identifiers of what :func:`seed` makes: half the generated requests name one of them,
#: so that they get past "not found" into the use cases
KNOWN = {
    "sn": [TERMINAL],
    "application_id": [PLATFORM],
    "gateway": [GATEWAY],
    "mdn": [MDN],
    "name": [KSRCRT_CA, GATEWAY],
}


def config_file(directory: Path) -> Path:
    """A schemathesis.toml binding path parameters to :data:`KNOWN` identifiers."""
    lines = []
    for parameter, values in KNOWN.items():
        lines += [f"[dictionaries.{parameter}]", f"values = {json.dumps(values)}", ""]
    lines.append("[parameters]")
    lines += [
        f'"path.{parameter}" = {{ dictionary = "{parameter}", probability = 0.5 }}'
        for parameter in KNOWN
    ]
    path = directory / "schemathesis.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def seed(base_url: str, spec: dict[str, Any], tokens: dict[str, str | None]) -> None:
    """Things for the requests to find: the TMK identity, a terminal, a platform, a gateway,
    a registered MDN (each made by the first role its operation admits)."""

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> None:
        role = spec["paths"][path][method.lower()]["x-roles"][0]
        url = base_url + path.format(sn=TERMINAL, application_id=PLATFORM, name=GATEWAY)
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        response = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert response.status_code < 300, (method, path, response.text)

    terminal_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    hpke_key = x25519.X25519PrivateKey.generate().public_key()
    call("POST", "/v1/tmk/identity")
    call("POST", "/v1/tmk/terminals", {"sn": TERMINAL, "public_key": pem(terminal_key)})
    call(
        "PUT",
        "/v1/keysync/platforms/{application_id}",
        {"url": "http://127.0.0.1:9/webhook", "hpke_public_key_pem": pem(hpke_key)},
    )
    call(
        "PUT",
        "/v1/keysync/gateways/{name}",
        {"webhook_url": "http://127.0.0.1:9/sms", "secret": "schemathesis-gateway-secret"},
    )
    call("POST", "/v1/keysync/registrations", {"mdn": MDN, "application_ids": [PLATFORM]})


def pem(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def run_schemathesis(
    base_url: str, caller: str, token: str | None, operation_ids: list[str], report: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [
        *schemathesis_command(),
        "--config-file", str(config_file(report.parent)),
        "run",
        f"{base_url}/openapi.json",
        "--url", base_url,
        "--checks", "all",
        "--exclude-checks", EXCLUDED_CHECKS,
        "--phases", PHASES,
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--generation-database", "none",
        "--request-timeout", "30",
        "--no-color",
        "--report", "junit",
        "--report-junit-path", str(report),
        "--suppress-health-check", "all",
    ]  # fmt: skip
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    for operation_id in operation_ids:
        command += ["--include-operation-id", operation_id]
    began = time.monotonic()
    result = subprocess.run(  # in the test's directory: its caches stay out of the repository
        command, capture_output=True, text=True, timeout=900, check=False, cwd=report.parent
    )
    return result, time.monotonic() - began


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'trustfleet.db'}"
    else:
        with postgres_schema("st_") as url:
            yield url


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=needs_postgres)])
def test_schemathesis_finds_no_server_error_and_no_undeclared_answer(
    tmp_path: Path, kind: str
) -> None:
    with database(kind, tmp_path) as database_url:
        run_against(database_url, tmp_path)


def run_against(database_url: str, tmp_path: Path) -> None:
    admin = admin_token_for(database_url)
    node = start_node("a", node_environment(database_url, tmp_path), tmp_path / "node")
    try:
        wait_ready(node)
        spec = httpx.get(f"{node.url}/openapi.json").json()
        callers = operations_by_caller(spec)
        tokens: dict[str, str | None] = {ANONYMOUS: None}
        for role in ROLE_ORDER:
            created = httpx.post(
                f"{node.url}/v1/tokens",
                json={"name": f"schemathesis {role}", "role": role},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert created.status_code == 201, created.text
            tokens[role] = created.json()["token"]
        seed(node.url, spec, tokens)
        failures, figures = [], []
        for caller in [ANONYMOUS, *ROLE_ORDER]:
            if caller not in callers:
                continue
            report = tmp_path / f"junit-{caller}.xml"
            result, seconds = run_schemathesis(
                node.url, caller, tokens[caller], callers[caller], report
            )
            figures.append(_figures(caller, len(callers[caller]), seconds, result.stdout))
            if result.returncode != 0:
                failures.append(f"--- as {caller} ---\n{result.stdout[-20000:]}")
        print(json.dumps(figures, indent=1))
        assert not failures, "\n".join(failures)
        assert "Traceback" not in node.log.read_text(), node.log.read_text()[-5000:]
    finally:
        stop(node)


def _figures(caller: str, operations: int, seconds: float, output: str) -> dict[str, Any]:
    """The run's figures: schemathesis prints ``Test cases:`` and the counts below it."""
    lines = [line.strip() for line in output.splitlines()]
    cases = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "Test cases:"), "")
    return {"caller": caller, "operations": operations, "seconds": round(seconds, 1),
            "test_cases": cases}  # fmt: skip
