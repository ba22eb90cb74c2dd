"""What a capability's ``trustfleet demo`` step gets: the demo's environment (an
in-process server over the real HTTP API, the admin token, a work directory)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # starlette's notice about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from trustfleet.errors import TrustfleetError
from trustfleet.kit.cli import console
from trustfleet.server.context import AppContext


@dataclass
class DemoEnv:
    context: AppContext
    client: TestClient
    admin_token: str
    workdir: Path

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        """One API call; a non-2xx answer stops the demo with its problem code."""
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        headers.update(kwargs.pop("headers", {}))
        response = self.client.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            problem = response.json()
            raise DemoFailed(f"{method} {path}: {problem.get('code')}: {problem.get('detail')}")
        return response.json() if "json" in response.headers.get("content-type", "") else response

    def tokens(self, step: str, *roles: str) -> dict[str, str]:
        """A new API token per role for the demo step ``step`` (token names are unique:
        ``demo <step> <role>``), by role."""
        return {
            role: self.call(
                "POST", "/v1/tokens", json={"name": f"demo {step} {role}", "role": role}
            )["token"]
            for role in roles
        }


class DemoFailed(TrustfleetError):
    code = "demo-failed"
    title = "A demo step failed"


def step_title(title: str) -> None:
    """The rule a demo step prints before its output."""
    console.rule(f"[bold]{title}")
