"""``trustfleet se`` as a user runs it: one subprocess per verb, in-process SE on its NV file."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_cli

pytestmark = pytest.mark.slow


def se(tmp_path: Path, *args: str, check: bool = True) -> str:
    result = run_cli(tmp_path / "data", "se", *args, check=check)
    if not check:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr
    return result.stdout


def test_manufacture_bind_verify_status_steal_and_reset(tmp_path: Path) -> None:
    nv, issuer = str(tmp_path / "se.nv"), str(tmp_path / "issuer.key")
    made = se(tmp_path, "manufacture", "--nv", nv, "--issuer-key", issuer, "--holder-data", "x")
    assert "issuer key made" in made
    assert (tmp_path / "issuer.key").stat().st_mode & 0o077 == 0
    gw1 = ["--nv", nv, "--host-dir", str(tmp_path / "gw1")]
    gw2 = ["--nv", nv, "--host-dir", str(tmp_path / "gw2")]
    assert "error [se-not-bound]" in se(tmp_path, "verify", *gw1, check=False)
    bound = se(tmp_path, "bind", *gw1, "--device-id", "gw-1", "--mode", "cipher", "--suite", "gm")
    assert "bound and locked (cipher, gm)" in bound
    assert "event locked: gw-1" in bound
    assert "verified (cipher, gm, 3 APDU exchanges)" in se(tmp_path, "verify", *gw1)
    status = se(tmp_path, "status", *gw1)
    assert "locked" in status and "yes" in status
    refused = se(tmp_path, "bind", *gw2, "--device-id", "gw-2", check=False)
    assert refused.strip().startswith("error [se-bound-elsewhere]")
    assert "reset: blank" in se(tmp_path, "reset", *gw2, "--issuer-key", issuer)
    assert "bound and locked (mutual, p256)" in se(tmp_path, "bind", *gw2, "--device-id", "gw-2")
    assert "error [se-bound-elsewhere]" in se(tmp_path, "verify", *gw1, check=False)


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    message = se(tmp_path, "verify", "--host-dir", str(tmp_path / "h"), check=False)
    assert (
        message.strip()
        == "error [invalid-input]: give exactly one of --nv, --reader or --vpcd-listen"
    )
