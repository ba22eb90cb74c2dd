"""The reference application platform receiver (``trustfleet platform-receiver``): the
endpoint key-sync deliveries are pushed to, what an application team would start from.

It checks the Standard Webhooks signature (``v1`` HMAC or ``v1a`` Ed25519) and timestamp,
opens the HPKE-sealed payload with its private key (bound to its application ID and the
``webhook-id``), and stores the key once per ``webhook-id``: a retried delivery is
acknowledged and not stored again. Keys are stored in its own SQLite file; a real platform
would put them in its own key store.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from trustfleet.keysync.errors import KeysyncPayloadInvalid
from trustfleet.keysync.protocol import KeyDelivery, open_delivery
from trustfleet.kit.outbox.webhooks import Verifier, WebhookVerificationFailed
from trustfleet.wire import utcnow

WEBHOOK_PATH = "/webhook"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    webhook_id TEXT PRIMARY KEY,
    application_id TEXT NOT NULL,
    mdn TEXT NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key BLOB NOT NULL,
    received_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class StoredKey:
    webhook_id: str
    application_id: str
    mdn: str
    key_id: str
    algorithm: str
    key: bytes

    def __repr__(self) -> str:
        return f"StoredKey({self.webhook_id!r}, {self.mdn!r}, {self.key_id!r})"


class ReceivedKeys:
    """The platform's store of received keys, one row per ``webhook-id``."""

    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute(_SCHEMA)
        self._lock = threading.Lock()

    def store(self, webhook_id: str, delivery: KeyDelivery, now: datetime) -> bool:
        """True if stored now, False if this webhook-id was stored before."""
        with self._lock:
            cursor = self._connection.execute(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (webhook_id, delivery.application_id, delivery.mdn, delivery.key_id,
                 delivery.algorithm, delivery.key, now.isoformat()),
            )  # fmt: skip
            return cursor.rowcount == 1

    def all(self) -> list[StoredKey]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT webhook_id, application_id, mdn, key_id, algorithm, key"
                " FROM deliveries ORDER BY received_at"
            ).fetchall()
        return [StoredKey(*row) for row in rows]

    def close(self) -> None:
        self._connection.close()


def create_receiver_app(
    *,
    application_id: str,
    private_key: x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey,
    verifier: Verifier,
    keys: ReceivedKeys,
    clock: Callable[[], datetime] = utcnow,
) -> Starlette:
    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            webhook_id = verifier.verify(body, request.headers, clock())
        except WebhookVerificationFailed as exc:
            return JSONResponse({"code": exc.code, "detail": exc.message}, status_code=401)
        try:
            delivery = open_delivery(
                body, platform_key=private_key, application_id=application_id,
                delivery_id=webhook_id,
            )  # fmt: skip
        except KeysyncPayloadInvalid as exc:
            return JSONResponse({"code": exc.code, "detail": exc.message}, status_code=400)
        stored = keys.store(webhook_id, delivery, clock())
        return JSONResponse({"stored": stored, "key_id": delivery.key_id})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, webhook, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServedReceiver:
    """A receiver app served by uvicorn on a loopback port, on a thread (the demo's)."""

    def __init__(self, app: Starlette, port: int) -> None:
        import uvicorn

        self.port = port
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> ServedReceiver:
        import time

        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the receiver did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
