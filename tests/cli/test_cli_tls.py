"""TLS: ``serve --tls-local-ca`` answers with a certificate from the local CA; a client that
does not trust that CA is refused, one given it (``--ca-file``, ``TRUSTFLEET_CACERT``)
succeeds, and so does the POS emulator. ``--tls-cert/--tls-key`` serve operator files."""

from __future__ import annotations

import json
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from harness import Served, run_cli, served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("tls") / "data"
    with served(data, "--tls-local-ca", "--tls-name", "keys.example") as running:
        yield running


def test_the_certificate_comes_from_the_local_ca(tls_server: Served) -> None:
    tls = tls_server.data_dir / "tls"
    assert stat.S_IMODE((tls / "server.key").stat().st_mode) == 0o600
    leaf, issuing = x509.load_pem_x509_certificates((tls / "server.pem").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "keys.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert leaf.issuer == issuing.subject
    records = run_cli(tls_server.data_dir, "audit", "list", "--action", "pki.*", "-o", "json")
    assert any(r["actor"] == "cli" for r in json.loads(records.stdout)["items"])


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: Served, tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "--server", tls_server.url, "whoami",
        env={"TRUSTFLEET_TOKEN": tls_server.admin_token}, check=False,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error [tls-untrusted]: the certificate of {tls_server.url}")
    assert "--ca-file" in lines[0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/healthz")  # the system's CAs do not know it either


def test_plain_http_against_the_tls_server_says_to_use_https(
    tls_server: Served, tmp_path: Path
) -> None:
    plain = tls_server.url.replace("https://", "http://")
    result = run_cli(
        tmp_path, "--server", plain, "whoami",
        env={"TRUSTFLEET_TOKEN": tls_server.admin_token}, check=False,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error [server-unreachable]: ") and "https://" in lines[0]


def test_a_client_that_trusts_the_ca_succeeds(tls_server: Served, tmp_path: Path) -> None:
    root = tls_server.data_dir / "ca" / "root.pem"
    token = {"TRUSTFLEET_TOKEN": tls_server.admin_token}
    by_option = run_cli(tmp_path, "--server", tls_server.url, "--ca-file", str(root), "whoami",
                        env=token)  # fmt: skip
    assert "bootstrap admin" in by_option.stdout
    by_env = run_cli(tmp_path, "--server", tls_server.url, "token", "list",
                     env={**token, "TRUSTFLEET_CACERT": str(root)})  # fmt: skip
    assert "bootstrap admin" in by_env.stdout
    verified = httpx.get(
        tls_server.url + "/healthz", verify=ssl.create_default_context(cafile=str(root))
    )
    assert verified.json() == {"status": "ok"}


def test_another_ca_is_not_enough(tls_server: Served, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_cli(other, "init")
    result = run_cli(
        tmp_path, "--server", tls_server.url, "--ca-file", str(other / "ca" / "root.pem"),
        "whoami", env={"TRUSTFLEET_TOKEN": tls_server.admin_token}, check=False,
    )  # fmt: skip
    assert result.returncode == 3 and "error [tls-untrusted]" in result.stderr


def test_the_pos_emulator_verifies_the_server_too(tls_server: Served, tmp_path: Path) -> None:
    root = str(tls_server.data_dir / "ca" / "root.pem")
    admin = {
        "TRUSTFLEET_TOKEN": tls_server.admin_token,
        "TRUSTFLEET_ADDR": tls_server.url,
        "TRUSTFLEET_CACERT": root,
    }

    def token(name: str, role: str) -> dict[str, str]:
        made = run_cli(tmp_path, "token", "create", "--name", name, "--role", role, "-o",
                       "json", env=admin)  # fmt: skip
        return {**admin, "TRUSTFLEET_TOKEN": json.loads(made.stdout)["token"]}

    run_cli(tmp_path, "tmk", "identity", "init", env=admin)
    pos = tmp_path / "pos"
    untrusting = run_cli(
        tmp_path, "--server", tls_server.url, "emulate", "pos", "factory", "--sn", "TLS-1",
        "--out", str(pos), check=False,
    )  # fmt: skip
    assert untrusting.returncode == 3 and "error [tls-untrusted]" in untrusting.stderr
    assert not pos.exists()
    run_cli(tmp_path, "emulate", "pos", "factory", "--sn", "TLS-1", "--out", str(pos), env=admin)
    run_cli(tmp_path, "tmk", "import", str(pos / "record.ndjson"),
            env=token("tls maker", "manufacturer"))  # fmt: skip
    downloaded = run_cli(tmp_path, "emulate", "pos", "download", "--dir", str(pos),
                         env=token("tls gateway", "device-gateway"))  # fmt: skip
    assert "active (KCV" in downloaded.stdout


def test_operator_files_are_served_as_given(tls_server: Served, tmp_path: Path) -> None:
    tls = tls_server.data_dir / "tls"
    data = tmp_path / "data"
    root = tls_server.data_dir / "ca" / "root.pem"
    with served(
        data,
        "--tls-cert",
        str(tls / "server.pem"),
        "--tls-key",
        str(tls / "server.key"),
        ca_file=root,
    ) as other:  # the first server's certificate, under the first data directory's CA
        answer = httpx.get(
            other.url + "/healthz", verify=ssl.create_default_context(cafile=str(root))
        )
        assert answer.status_code == 200
        assert not (data / "tls").exists()  # nothing issued for it


def test_tls_options_are_checked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli(data, "init")
    half = run_cli(data, "serve", "--tls-cert", "x.pem", check=False)
    assert half.returncode == 2 and "give both --tls-cert and --tls-key" in half.stderr
    missing = run_cli(data, "serve", "--tls-cert", "x.pem", "--tls-key", "y.pem", check=False)
    assert missing.returncode == 2 and "error [file-unreadable]: --tls-cert x.pem" in missing.stderr
