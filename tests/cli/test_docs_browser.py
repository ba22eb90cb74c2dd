"""``/docs`` works without the internet: headless Chromium, allowed to resolve no host but
the loopback address, opens the page on a running server and finds the routes on it. The
screenshot is kept in the test's temporary directory (``docs.png``, under pytest's
``--basetemp``, by default ``/tmp/pytest-of-<user>/pytest-<n>/test_docs_...0/``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import served

pytestmark = pytest.mark.slow

CHROMIUM_SECONDS = 120
#: routes the page must list (spine, PKI, TMK)
EXPECTED_ROUTES = ("/v1/tokens", "/v1/whoami", "/v1/audit", "/v1/ca", "/v1/tmk/terminals")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is not installed: `scripts/dev test` installs it")
    return found


def headless(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # no host but the server resolves: a page that needs a CDN stays blank
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_SECONDS, check=False
    )


def test_docs_show_the_routes_offline(tmp_path: Path) -> None:
    with served(tmp_path / "data") as server:
        page = f"{server.url}/docs"
        dom = headless(tmp_path / "profile", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-2000:]
        missing = [route for route in EXPECTED_ROUTES if route not in dom.stdout]
        assert missing == [], f"not on the page: {missing}"
        assert 'class="swagger-ui' in dom.stdout
        screenshot = tmp_path / "docs.png"
        shot = headless(
            tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", page
        )
        assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
