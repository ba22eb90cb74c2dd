"""Start a node: build the app context from settings, then serve with uvicorn.

``uvicorn --factory trustfleet.server.runner:app_from_env`` builds the app from the
``TRUSTFLEET_*`` environment (and the data directory's ``trustfleet.toml``), so several
processes can be started the same way against one PostgreSQL database.
"""

from __future__ import annotations

import errno
import gc
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import Engine, text

from trustfleet.errors import Conflict, InvalidInput
from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext
from trustfleet.server.logging import configure_logging
from trustfleet.settings import Settings, load_settings
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate

_POSTGRES_MIGRATION_LOCK = 0x74666D6967  # advisory lock id: one node migrates at a time
LISTEN_BACKLOG = 2048


class PortInUse(Conflict):
    code = "port-in-use"
    title = "The address and port are in use by another program"


class CannotListen(InvalidInput):
    code = "cannot-listen"
    title = "The server cannot listen on that address"


@dataclass(frozen=True)
class TlsFilePair:
    """The certificate chain (PEM) and private key (PEM) ``serve`` answers TLS with."""

    cert: Path
    key: Path


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Nodes starting together against one PostgreSQL database take turns migrating."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        # a node waits for another's migration however long it takes (the engine's
        # lock_timeout bounds the waits of requests, not this one)
        connection.execute(text("SET LOCAL lock_timeout = 0"))
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _POSTGRES_MIGRATION_LOCK})
        try:
            yield
        finally:
            connection.execute(
                text("SELECT pg_advisory_unlock(:k)"), {"k": _POSTGRES_MIGRATION_LOCK}
            )
            connection.commit()


def build_context(settings: Settings) -> AppContext:
    """The database (migrated) and the key store for ``settings``."""
    from trustfleet.keystore import open_keystore

    engine = make_engine(settings.resolved_database_url)
    with _migration_lock(engine):
        migrate(engine)
    db = Database(engine)
    return AppContext(settings=settings, db=db, keystore=open_keystore(settings, db))


def _freeze_startup_objects() -> None:
    """Move everything made at startup (modules, models, routes) out of the garbage
    collector's reach: a full collection would otherwise walk ~150,000 long-lived objects
    every few hundred requests (bench/RESULTS.md has what that costs a TMK download)."""
    gc.collect()
    gc.freeze()


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory``: settings from the environment."""
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(build_context(settings))
    _freeze_startup_objects()
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; :class:`PortInUse` names the address when
    another program holds it (uvicorn would only log it and exit)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"{host}:{port} is already in use by another program",
                hint="stop it, or choose another port with --port (or TRUSTFLEET_PORT)",
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


#: started with the server on its app context; returns what stops it
Background = Callable[[AppContext], Callable[[], None]]


def serve(
    settings: Settings,
    tls: TlsFilePair | None = None,
    *,
    background: Sequence[Background] = (),
) -> None:
    """Serve on ``settings.host``:``settings.port`` (with TLS if ``tls``) until
    interrupted, with ``background`` tasks (the outbox's delivery worker, say) running
    beside it and stopped after it."""
    import uvicorn

    sock = bind(settings.host, settings.port)
    configure_logging(settings.log_level)
    context = build_context(settings)
    app = create_app(context)
    _freeze_startup_objects()
    stops = [start(context) for start in background]
    try:
        config = uvicorn.Config(
            app,
            log_config=None,  # keep our JSON logging
            access_log=False,  # the request middleware writes the access line
            server_header=False,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for stop in reversed(stops):
            stop()
