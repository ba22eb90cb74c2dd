"""Help that reads well: no reStructuredText markup, no ``<bool>`` labels on flags, the
complete role list, global options on every verb, shell completion, ``--version``; and
``ca show`` prints what its help promises without cutting names."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from harness import run_cli
from trustfleet import __version__
from trustfleet.cli.main import app
from trustfleet.kit import cli as kit_cli
from trustfleet.server.models import ROLES

MARKUP = ("``", ":class:", ":func:", ":data:", ":mod:", ":meth:", "<bool>")


def _paths(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _paths(sub, [*path, name])


def help_of(path: list[str], monkeypatch: pytest.MonkeyPatch, columns: int = 120) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = kit_cli.run(app, [*path, "--help"])
    assert status == 0, path
    return out.getvalue()


def every_path() -> list[list[str]]:
    return list(_paths(typer.main.get_command(app), []))


def test_every_help_reads_as_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = every_path()
    assert len(paths) > 40
    for path in paths:
        text = help_of(path, monkeypatch)
        assert "Usage: trustfleet" in text, path
        found = [mark for mark in MARKUP if mark in text]
        assert found == [], (path, found)


def test_every_verb_takes_the_global_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in (["token", "list"], ["tmk", "import"], ["emulate", "pos", "download"]):
        text = help_of(path, monkeypatch)
        for option in ("--server", "--ca-file", "--output", "--debug", "--data-dir"):
            assert option in text, (path, option)


def test_role_options_list_every_role(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in (["token", "create"], ["login"]):
        text = help_of(path, monkeypatch, columns=400)  # wide enough for the list on one line
        missing = [role for role in ROLES if role not in text]
        assert missing == [], (path, missing)


def test_version_and_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert kit_cli.run(app, ["--version"]) == 0
    assert out.getvalue() == f"trustfleet {__version__}\n"
    assert "--install-completion" in help_of([], monkeypatch)


@pytest.mark.slow
def test_ca_show_prints_names_and_subjects_whole(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli(data, "init")
    run_cli(data, "tmk", "identity", "init")
    cas = json.loads(run_cli(data, "ca", "show", "-o", "json").stdout)
    shown = run_cli(data, "ca", "show", env={"COLUMNS": "80"}).stdout
    assert "…" not in shown
    for ca in cas:
        for field in ("name", "parent", "algorithm", "subject", "serial"):
            assert (ca[field] or "a root") in shown, (ca["name"], field)
        assert f"{ca['not_before'][:10]} .. {ca['not_after'][:10]}" in shown
    help_text = run_cli(data, "ca", "show", "--help").stdout
    assert "name, parent, algorithm, subject, serial and validity" in help_text
