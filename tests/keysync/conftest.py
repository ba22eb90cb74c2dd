"""What the key-sync tests share: an app over a real database and soft key store, tokens
per role, the platform and gateway registered, terminals made at the factory and imported,
real HTTP servers on localhost (the platform receiver), and what the database holds."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.keysync.models import Binding
from trustfleet.keysync.receiver import ReceivedKeys, create_receiver_app
from trustfleet.keysync.terminal import M2mTerminal, post_sms
from trustfleet.kit.outbox import DeliveryWorker
from trustfleet.kit.outbox.models import OutboxMessage
from trustfleet.kit.outbox.webhooks import Verifier, decode_public_key, decode_secret
from trustfleet.server.app import create_app
from trustfleet.server.auth import create_token
from trustfleet.server.context import AppContext
from trustfleet.server.models import ROLES
from trustfleet.settings import Settings
from trustfleet.store import Database
from trustfleet.store.audit import iter_records

APP = "meter-app"
GATEWAY = "twilio"
GATEWAY_SECRET = "12345678901234567890123456789012"
WEBHOOK = f"http://testserver/v1/keysync/sms/{GATEWAY}"
KMP_NUMBER = "+8610690000"
FAST_SCHEDULE = (0, 0, 0, 0, 0, 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """An ASGI app served by uvicorn on a loopback port, in a thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text[:500]
    return response.json() if response.content else None


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


@pytest.fixture
def context(tmp_path: Path, db: Database) -> AppContext:
    settings = Settings(data_dir=tmp_path)
    keystore = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
    return AppContext(settings=settings, db=db, keystore=keystore)


@pytest.fixture
def client(context: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(context), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tokens(db: Database) -> dict[str, str]:
    return {role: create_token(db, f"test {role}", role)[0] for role in sorted(ROLES)}


@dataclass
class Platform:
    """An application platform: its HPKE key pair, its receiver (served for real) and the
    verifier the key management platform gave it."""

    application_id: str
    private_key: x25519.X25519PrivateKey
    keys: ReceivedKeys
    server: ServerThread | None = None
    verifier: Verifier | None = None

    @property
    def public_pem(self) -> str:
        public = self.private_key.public_key()
        return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

    def app(self) -> Any:
        assert self.verifier is not None
        return create_receiver_app(
            application_id=self.application_id,
            private_key=self.private_key,
            verifier=self.verifier,
            keys=self.keys,
        )


def register_platform(
    client: TestClient, tokens: dict[str, str], platform: Platform, url: str, signing: str = "v1a"
) -> dict[str, Any]:
    answer = ok(
        client.put(
            f"/v1/keysync/platforms/{platform.application_id}",
            headers=auth(tokens["admin"]),
            json={"url": url, "hpke_public_key_pem": platform.public_pem, "signing": signing},
        )
    )
    if signing == "v1a":
        platform.verifier = Verifier(public_key=decode_public_key(answer["verifier"]))
    else:
        platform.verifier = Verifier(secret=decode_secret(answer["verifier"]))
    return dict(answer)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    keys = ReceivedKeys(tmp_path / "platform-keys.db")
    made = Platform(APP, x25519.X25519PrivateKey.generate(), keys)
    yield made
    if made.server is not None:
        made.server.stop()
    keys.close()


@pytest.fixture
def live_platform(platform: Platform, client: TestClient, tokens: dict[str, str]) -> Platform:
    """The platform registered with the key management platform and its receiver up."""
    port = free_port()
    register_platform(client, tokens, platform, f"http://127.0.0.1:{port}/webhook")
    platform.server = ServerThread(platform.app(), port).start()
    return platform


@pytest.fixture
def gateway(client: TestClient, tokens: dict[str, str]) -> str:
    ok(
        client.put(
            f"/v1/keysync/gateways/{GATEWAY}",
            headers=auth(tokens["admin"]),
            json={"webhook_url": WEBHOOK, "secret": GATEWAY_SECRET},
        )
    )
    return GATEWAY


@pytest.fixture
def make_terminal(
    tmp_path: Path, client: TestClient, tokens: dict[str, str]
) -> Callable[..., M2mTerminal]:
    """A terminal made at the factory, its keys imported (CSV over the API) and its MDN
    registered for its applications, unless told otherwise."""
    counter = iter(range(10_000))

    def make(
        mdn: str = "+861440000000001",
        applications: list[str | None] | None = None,
        *,
        register: list[str] | None = None,
        terminal_id: str | None = None,
    ) -> M2mTerminal:
        n = next(counter)
        apps = applications if applications is not None else [APP]
        terminal = M2mTerminal.factory(
            tmp_path / f"m2m-{n}", terminal_id or f"T-{n:04d}", mdn, apps
        )
        ok(
            client.put(
                f"/v1/keysync/imports/factory-{n}",
                headers={**auth(tokens["manufacturer"]), "Content-Type": "text/csv"},
                content=terminal.csv_rows(),
            )
        )
        registered = register if register is not None else [a or APP for a in apps]
        if registered:
            ok(
                client.post(
                    "/v1/keysync/registrations",
                    headers=auth(tokens["operator"]),
                    json={"mdn": mdn, "application_ids": sorted(set(registered))},
                )
            )
        return terminal

    return make


def send_sms(
    client: TestClient, terminal: M2mTerminal, body: str, *, secret: str = GATEWAY_SECRET
) -> httpx.Response:
    form = [
        ("MessageSid", "SM" + "1" * 32),
        ("From", terminal.mdn),
        ("To", KMP_NUMBER),
        ("Body", body),
    ]
    return post_sms(client, WEBHOOK, form, gateway_secret=secret)


def worker(context: AppContext, **kwargs: Any) -> DeliveryWorker:
    kwargs.setdefault("schedule", FAST_SCHEDULE)
    kwargs.setdefault("timeout_seconds", 2)
    return DeliveryWorker(context.db, context.keystore, **kwargs)


def drain(delivery: DeliveryWorker, rounds: int = 50) -> None:
    for _ in range(rounds):
        if not delivery.run_once():
            return


# -- what the database holds ---------------------------------------------------------------


def audit_actions(sessions: sessionmaker[Session]) -> list[tuple[str, dict[str, Any]]]:
    with sessions() as session:
        return [(r.action, json.loads(r.details)) for r in iter_records(session)]


def refusal_codes(sessions: sessionmaker[Session]) -> list[str]:
    return [
        str(details["code"])
        for action, details in audit_actions(sessions)
        if action == "keysync.sync_refused" and not details.get("aggregate")
    ]


def count(sessions: sessionmaker[Session], model: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def bindings(sessions: sessionmaker[Session]) -> int:
    return count(sessions, Binding)


def messages(sessions: sessionmaker[Session]) -> int:
    return count(sessions, OutboxMessage)
