"""The command lines as a user runs them, against a real server process: management verbs
as API clients (token from the environment), the emulator and the receiver's init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import admin_token_for, node_environment, run_cli, running_nodes

pytestmark = pytest.mark.slow


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "trustfleet.cli", *args],
        capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=120, check=False,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{args}: {result.returncode} {result.stdout}{result.stderr}")
    return result


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_verbs_against_a_server(tmp_path: Path, database_url: str) -> None:
    env = node_environment(database_url, tmp_path)
    admin = admin_token_for(database_url)
    with running_nodes(env, tmp_path, count=1) as (node,):
        tokens = {}
        for role in ("manufacturer", "operator"):
            answer = httpx.post(f"{node.url}/v1/tokens", json={"name": role, "role": role},
                                headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
            tokens[role] = answer.json()["token"]
        base = {**env, "TRUSTFLEET_ADDR": node.url, "TRUSTFLEET_DATA_DIR": str(tmp_path / "cli")}
        terminal = tmp_path / "t1"
        cli(base, "emulate", "m2m", "factory", "--dir", str(terminal), "--terminal-id", "T-1",
            "--mdn", "+861440000000001", "--app", "a", "--app", "b")  # fmt: skip
        rows = (terminal / "record.csv").read_text()
        assert rows.count("\n") == 3
        imported = cli({**base, "TRUSTFLEET_TOKEN": tokens["manufacturer"]}, "keysync", "import",
                       str(terminal / "record.csv"), "--output", "json")  # fmt: skip
        report = json.loads(imported.stdout)
        assert (report["accepted"], report["status"]) == (2, "completed")
        again = cli({**base, "TRUSTFLEET_TOKEN": tokens["manufacturer"]}, "keysync", "import",
                    str(terminal / "record.csv"), "--output", "json")  # fmt: skip
        assert json.loads(again.stdout) == report
        operator = {**base, "TRUSTFLEET_TOKEN": tokens["operator"]}
        cli(operator, "keysync", "register", "+86 1440000000001", "--app", "a")
        shown = json.loads(
            cli(operator, "keysync", "show", "+861440000000001", "-o", "json").stdout
        )
        assert shown["application_ids"] == ["a"]
        refused = cli(operator, "keysync", "import", str(terminal / "record.csv"), check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip().startswith("error [forbidden]")
        missing = cli({k: v for k, v in base.items() if k != "TRUSTFLEET_TOKEN"},
                      "keysync", "show", "+861440000000001", check=False)  # fmt: skip
        assert missing.returncode == 2 and "error [no-token]" in missing.stderr
        request = cli(base, "emulate", "m2m", "request", "--dir", str(terminal), "--app", "a")
        assert request.stdout.startswith("KS1 ") and " A=a C=1 M=" in request.stdout
        cli(base, "platform-receiver", "init", "--dir", str(tmp_path / "rx"))
        assert oct(os.stat(tmp_path / "rx" / "hpke.pem").st_mode & 0o777) == "0o600"
        destinations = cli({**base, "TRUSTFLEET_TOKEN": admin}, "outbox", "destinations", "-o",
                           "json")  # fmt: skip
        assert json.loads(destinations.stdout) == []


def test_the_verbs_on_the_local_data_directory(tmp_path: Path) -> None:
    """Without a server, the management verbs run as the local principal over the data
    directory, like every other verb; JSON output is the API's."""
    data_dir = tmp_path / "data"
    run_cli(data_dir, "init")
    terminal = tmp_path / "t1"
    run_cli(data_dir, "emulate", "m2m", "factory", "--dir", str(terminal), "--terminal-id",
            "T-1", "--mdn", "+861440000000001", "--app", "a")  # fmt: skip
    imported = run_cli(data_dir, "keysync", "import", str(terminal / "record.csv"), "-o", "json")
    assert json.loads(imported.stdout)["accepted"] == 1
    run_cli(data_dir, "keysync", "register", "+861440000000001", "--app", "a")
    shown = run_cli(data_dir, "--output", "json", "keysync", "show", "+861440000000001")
    assert json.loads(shown.stdout)["application_ids"] == ["a"]
    assert json.loads(run_cli(data_dir, "outbox", "destinations", "-o", "json").stdout) == []
    audit = run_cli(data_dir, "-o", "json", "audit", "list", "--action", "keysync.*").stdout
    assert {record["actor"] for record in json.loads(audit)["items"]} == {"cli"}
