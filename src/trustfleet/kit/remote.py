"""The HTTP client management verbs use: the server's address and an API token from the
environment (never from the command line), and problem+json answers turned back into
errors with the server's code, so the CLI prints ``error [code]: message``."""

from __future__ import annotations

import os
from typing import Any

import httpx

from trustfleet.errors import AuthenticationRequired, TrustfleetError
from trustfleet.kit.cli import state

ADDRESS_VARIABLE = "TRUSTFLEET_ADDR"
TOKEN_VARIABLE = "TRUSTFLEET_TOKEN"  # noqa: S105 - the variable's name


class RemoteError(TrustfleetError):
    """An error the server answered; subclasses made per answer carry its code."""

    code = "remote-error"
    status = 502
    title = "The server refused the request"


def server_address(server: str | None = None) -> str:
    """``server``, else ``$TRUSTFLEET_ADDR``, else this data directory's host and port."""
    if server:
        return server.rstrip("/")
    if os.environ.get(ADDRESS_VARIABLE):
        return os.environ[ADDRESS_VARIABLE].rstrip("/")
    settings = state.settings
    return f"http://{settings.host}:{settings.port}"


def api_client(server: str | None = None, *, timeout: float = 60) -> httpx.Client:
    """A client of the server's API with the token of ``$TRUSTFLEET_TOKEN``."""
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        raise AuthenticationRequired(f"set {TOKEN_VARIABLE} to an API token of the right role")
    return httpx.Client(
        base_url=server_address(server),
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def checked(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; a problem+json answer raised as an error with its code."""
    if response.status_code < 400:
        return response.json() if response.content else None
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    code = str(problem.get("code") or f"http-{response.status_code}")
    detail = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
    error = type("RemoteError", (RemoteError,), {"code": code, "status": response.status_code})
    raise error(detail)
