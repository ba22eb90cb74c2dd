"""Everything a newcomer can get wrong ends in one line ``error [code]: message`` naming
the file, URL or value, and an exit status of its kind; never a traceback. Each case runs
the real command line in a subprocess."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Served, free_port, run_cli, served

pytestmark = pytest.mark.slow

REFUSED, USAGE, UNREACHABLE = 1, 2, 3


def one_line(result: subprocess.CompletedProcess[str], status: int, code: str) -> str:
    """The error line of a run that failed with ``status`` and ``code``: exactly one line on
    standard error, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error [{code}]: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("errors") / "data") as running:
        yield running


@pytest.fixture
def data(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    run_cli(directory, "init")
    return directory


def test_an_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        tmp_path, "--server", url, "token", "list", env={"TRUSTFLEET_TOKEN": "tf_x"}, check=False
    )
    line = one_line(result, UNREACHABLE, "server-unreachable")
    assert f"cannot connect to {url}: connection refused" in line
    assert "trustfleet serve" in line  # the hint


def test_a_server_url_without_a_scheme(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "token", "list", "--server", "127.0.0.1:8080", check=False)
    line = one_line(result, USAGE, "invalid-server-url")
    assert "'127.0.0.1:8080'" in line and "http://127.0.0.1:8080" in line


def test_https_against_a_plain_http_server(tmp_path: Path, server: Served) -> None:
    https = server.url.replace("http://", "https://")
    result = run_cli(
        tmp_path,
        "--server",
        https,
        "whoami",
        env={"TRUSTFLEET_TOKEN": server.admin_token},
        check=False,
    )
    line = one_line(result, UNREACHABLE, "tls-failed")
    assert https in line and "use http://" in line


def test_http_against_the_right_server_works(tmp_path: Path, server: Served) -> None:
    result = run_cli(
        tmp_path, "--server", server.url, "whoami", env={"TRUSTFLEET_TOKEN": server.admin_token}
    )
    assert "bootstrap admin (role admin" in result.stdout


def test_a_missing_data_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = one_line(run_cli(missing, "token", "list", check=False), USAGE, "not-initialised")
    assert f"data directory {missing} does not exist" in line
    assert "run `trustfleet init`" in line


def test_a_data_directory_that_was_never_initialised(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line(run_cli(empty, "tmk", "list", check=False), USAGE, "not-initialised")
    assert f"{empty} is not an initialised trustfleet data directory" in line
    assert "run `trustfleet init`" in line
    assert list(empty.iterdir()) == []  # nothing was created there


def test_a_node_of_a_shared_database_needs_no_initialised_data_directory(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_cli(first, "init")
    shared = {
        "TRUSTFLEET_DATABASE_URL": f"sqlite:///{first / 'trustfleet.db'}",
        "TRUSTFLEET_MASTER_KEY_FILE": str(first / "master.key"),
    }
    second = tmp_path / "second"
    second.mkdir()  # never initialised: the database and the master key are elsewhere
    listed = run_cli(second, "--output", "json", "token", "list", env=shared)
    assert '"bootstrap admin"' in listed.stdout


def test_a_missing_file(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "emulate", "pos", "factory", "--sn", "POS-1", "--root", "nosuch.pem",
        "--out", str(tmp_path / "pos"), check=False,
    )  # fmt: skip
    line = one_line(result, USAGE, "file-unreadable")
    assert "--root nosuch.pem: no such file" in line
    assert not (tmp_path / "pos").exists()


def test_a_csv_that_is_not_utf8(data: Path, tmp_path: Path) -> None:
    latin1 = tmp_path / "terminals.csv"
    latin1.write_bytes("sn,model,public_key\nPOS-1,Caf\u00e9,xyz\n".encode("latin-1"))
    result = run_cli(data, "tmk", "import", str(latin1), check=False)
    line = one_line(result, REFUSED, "tmk-invalid-terminal-record")
    assert f"{latin1} is not UTF-8 text (line 2" in line and "save the file as UTF-8" in line


def test_factory_run_twice_names_the_file(tmp_path: Path) -> None:
    pos = tmp_path / "pos1"
    run_cli(tmp_path, "emulate", "pos", "factory", "--sn", "POS-1", "--out", str(pos))
    record = (pos / "record.ndjson").read_bytes()
    again = run_cli(
        tmp_path, "emulate", "pos", "factory", "--sn", "POS-1", "--out", str(pos), check=False
    )
    line = one_line(again, REFUSED, "tmk-scm-exists")
    assert f"{pos / 'device.key'} exists" in line
    assert (pos / "record.ndjson").read_bytes() == record  # nothing was overwritten


def test_a_port_already_in_use(data: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(data, "serve", "--port", str(port), check=False)
    line = one_line(result, REFUSED, "port-in-use")
    assert f"127.0.0.1:{port} is already in use" in line and "--port" in line


def test_plain_http_off_loopback_is_refused(data: Path) -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - refused before anything is bound
    result = run_cli(data, "serve", "--host", everywhere, "--port", "1", check=False)
    line = one_line(result, USAGE, "usage-error")
    assert "refusing plain HTTP on 0.0.0.0" in line and "--insecure-http" in line


def test_identity_show_on_a_fresh_server_says_what_to_run(data: Path) -> None:
    line = one_line(
        run_cli(data, "tmk", "identity", "show", check=False),
        REFUSED,
        "tmk-identity-not-initialised",
    )
    assert "trustfleet tmk identity init" in line
    cas = run_cli(data, "ca", "show", "-o", "json").stdout
    assert "tmk-ksrcrt" not in cas  # showing created nothing


def test_a_malformed_sn_is_a_usage_error(data: Path, tmp_path: Path) -> None:
    for args in (
        ("emulate", "pos", "factory", "--sn", "POS 1!", "--out", str(tmp_path / "p")),
        ("tmk", "show", "POS/1"),
        ("tmk", "register", "--sn", "-bad", "--public-key", "x.pem"),
    ):
        line = one_line(run_cli(data, *args, check=False), USAGE, "usage-error")
        assert "is not a serial number" in line, args


def test_a_short_pan_is_a_usage_error_as_on_the_server(tmp_path: Path) -> None:
    pos = tmp_path / "pos"
    run_cli(tmp_path, "emulate", "pos", "factory", "--sn", "POS-1", "--out", str(pos))
    result = run_cli(
        tmp_path, "emulate", "pos", "pin", "--dir", str(pos), "--pin", "1234", "--pan", "41111",
        check=False,
    )  # fmt: skip
    assert "a PAN is 12-19 decimal digits" in one_line(result, USAGE, "usage-error")


def test_the_old_token_flag_is_refused(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "--server", "http://127.0.0.1:1", "emulate", "pos", "download",
        "--token", "tf_secret", check=False,
    )  # fmt: skip
    line = one_line(result, USAGE, "usage-error")
    assert "--token is not accepted" in line and "TRUSTFLEET_TOKEN" in line
    assert "tf_secret" not in result.stdout + result.stderr


def test_no_token_for_a_remote_server(tmp_path: Path, server: Served) -> None:
    line = one_line(
        run_cli(tmp_path, "--server", server.url, "token", "list", check=False), USAGE, "no-token"
    )
    assert server.url in line and "trustfleet login" in line


def test_a_refused_token_is_one_line_with_a_hint(tmp_path: Path, server: Served) -> None:
    result = run_cli(
        tmp_path, "--server", server.url, "token", "list",
        env={"TRUSTFLEET_TOKEN": "tf_" + "A" * 43}, check=False,
    )  # fmt: skip
    line = one_line(result, REFUSED, "authentication-required")
    assert "trustfleet login" in line


def test_usage_errors_are_one_line_too(data: Path) -> None:
    for args, text in (
        (("token", "create", "--name", "x", "--role", "root"), "'root' is not one of"),
        (("no-such-verb",), "No such command"),
        (("token", "list", "--output", "xml"), "'xml' is not one of"),
    ):
        line = one_line(run_cli(data, *args, check=False), USAGE, "usage-error")
        assert text in line, line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli(missing, "--debug", "token", "list", check=False)
    assert result.returncode == USAGE
    assert "Traceback (most recent call last)" in result.stderr
    assert re.search(r"^error \[not-initialised\]: ", result.stderr.splitlines()[-1])
