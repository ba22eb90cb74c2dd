"""Start a node: build the app context from settings, then serve with uvicorn.

``uvicorn --factory trustfleet.server.runner:app_from_env --http
trustfleet.server.protocol:HttpProtocol`` builds the app from the ``TRUSTFLEET_*``
environment (and the data directory's ``trustfleet.toml``), so several processes can be
started the same way against one PostgreSQL database; ``--http`` names the protocol with
the header limits (:mod:`trustfleet.server.protocol`).
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import Engine, text

from trustfleet.errors import Conflict, InvalidInput
from trustfleet.server.app import create_app
from trustfleet.server.audit_trail import install_audit_trail
from trustfleet.server.context import AppContext
from trustfleet.server.logging import configure_logging
from trustfleet.server.protocol import protocol_for
from trustfleet.settings import Settings, load_settings
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate
from trustfleet.store.files import check_private_directory

_POSTGRES_MIGRATION_LOCK = 0x74666D6967  # advisory lock id: one node migrates at a time
LISTEN_BACKLOG = 2048

log = logging.getLogger("trustfleet.server")


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
    context = AppContext(settings=settings, db=db, keystore=open_keystore(settings, db))
    install_audit_trail(context)
    return context


def _freeze_startup_objects() -> None:
    """Move everything made at startup (modules, models, routes) out of the garbage
    collector's reach: a full collection would otherwise walk ~150,000 long-lived objects
    every few hundred requests (bench/RESULTS.md has what that costs a TMK download)."""
    gc.collect()
    gc.freeze()


def check_data_dir(settings: Settings) -> None:
    """Refuse to serve from a data directory other users can read (its database, master
    key and CA files are in it), as the master key file is refused: ``data-dir-permissions``
    with the ``chmod`` that fixes it. A node without a data directory (PostgreSQL, the
    master key in the environment) has nothing there to protect."""
    check_private_directory(settings.data_dir)


#: the ``--http`` value that serves the app with trustfleet's limits
HTTP_PROTOCOL = "trustfleet.server.protocol:HttpProtocol"


def protocol_warning(argv: Sequence[str]) -> str | None:
    """What to warn about when uvicorn's command line (``argv``) serves the app without
    trustfleet's HTTP protocol: its own buffers headers without limit and has no
    header-read timeout. None for other command lines (they are not recognised)."""
    if not argv or "uvicorn" not in (Path(argv[0]).name, Path(argv[0]).parent.name):
        return None
    chosen = "auto"
    for i, arg in enumerate(argv):
        if arg == "--http" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif arg.startswith("--http="):
            chosen = arg.removeprefix("--http=")
    if chosen == HTTP_PROTOCOL:
        return None
    return (
        f"uvicorn serves with --http {chosen}, not {HTTP_PROTOCOL}: request headers are "
        "not limited in size or read time and uvicorn's own errors are text/plain "
        "(docs/configuration.md)"
    )


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory``: settings from the environment."""
    settings = load_settings()
    check_data_dir(settings)
    configure_logging(settings.log_level)
    warning = protocol_warning(sys.argv)
    if warning is not None:
        log.warning(warning)
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

    check_data_dir(settings)
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
            http=protocol_for(settings),  # header size and read-time limits, problem+json
            ws="none",
            timeout_keep_alive=settings.keep_alive_timeout,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for stop in reversed(stops):
            stop()
