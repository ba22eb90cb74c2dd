"""The local principal: how the CLI at the data directory calls the API in process.

Every management verb of the CLI is a client of the HTTP API (``trustfleet.kit.cli``). With
``--server`` it calls a running server with a token. Without it, it builds the same app over
the local data directory and calls it in this process, wrapped in :func:`in_process`: that
wrapper puts a marker object in each request's ASGI scope, and the role check
(:mod:`trustfleet.server.deps`) answers such a request as :data:`LOCAL_PRINCIPAL` (actor
``cli``), admitted by every role check, with no token.

Why nobody else can be the local principal:

- the marker is a private Python object, compared by identity under a scope key of its own.
  An ASGI server (uvicorn) builds a network request's scope from what arrives on the wire:
  method, path, query, headers, client address. None of that can become an object in the
  scope, let alone this one; only code running in this process, holding the app, can;
- ``trustfleet serve`` and ``runner.app_from_env`` never wrap the app: only the CLI's local
  client does, around an app it built for itself and never binds to a socket.

Why it may pass every role check: whoever runs the CLI on the data directory already holds
the master key file and the database (or their settings), so they can read and change
everything without the API. The local principal gives them nothing more, and it sends what
they do through the same use cases, checks and audit records as any token.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from trustfleet.server.auth import LOCAL_PRINCIPAL

__all__ = ["LOCAL_PRINCIPAL", "in_process", "is_local"]

_SCOPE_KEY = "trustfleet.local_principal"


class _LocalMark:
    """The marker's type: nothing outside this module makes one."""

    __slots__ = ()


_MARK = _LocalMark()


def in_process(app: ASGIApp) -> ASGIApp:
    """``app`` for the CLI's in-process calls: every HTTP request is the local principal's.
    Never serve the result on a socket."""

    async def local_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, _SCOPE_KEY: _MARK}
        await app(scope, receive, send)

    return local_app


def is_local(scope: Scope) -> bool:
    """True for a request that :func:`in_process` marked."""
    return scope.get(_SCOPE_KEY) is _MARK
