"""The whole flow with the PKCS#11 key store (SoftHSM2): the KEK, the fingerprint key and
the platform's signing keys are token objects; nothing needs more than the KeyStore
interface."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from fastapi.testclient import TestClient

from harness import SoftHsmToken, init_softhsm_token
from trustfleet.keystore.base import KeyStore
from trustfleet.keysync.terminal import M2mTerminal
from trustfleet.server.app import create_app
from trustfleet.server.context import AppContext
from trustfleet.settings import Settings
from trustfleet.store import Database

from .conftest import (
    Platform,
    ServerThread,
    auth,
    drain,
    free_port,
    ok,
    register_platform,
    send_sms,
    worker,
)

pytestmark = pytest.mark.pkcs11


@pytest.fixture(scope="module")
def module_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftHsmToken, Path]:
    """A SoftHSM2 token of this module's own (``harness.init_softhsm_token``)."""
    return init_softhsm_token(tmp_path_factory.mktemp("keysync-softhsm"), "keysync-test")


@pytest.fixture
def keystore(
    module_token: tuple[SoftHsmToken, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[KeyStore]:
    from trustfleet.keystore.pkcs11 import Pkcs11KeyStore

    token, conf = module_token
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    store = Pkcs11KeyStore(token.module, token.label, token.user_pin)
    yield store
    store.close()


@pytest.fixture
def context(tmp_path: Path, db: Database, keystore: KeyStore) -> AppContext:
    settings = Settings(data_dir=tmp_path, keystore_backend="pkcs11")
    return AppContext(settings=settings, db=db, keystore=keystore)


@pytest.fixture
def client(context: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(context), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("signing", ["v1a", "v1"])
def test_the_flow_on_a_pkcs11_token(
    tmp_path: Path,
    client: TestClient,
    context: AppContext,
    tokens: dict[str, str],
    gateway: str,
    platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
    signing: str,
) -> None:
    assert context.keystore.backend == "pkcs11"
    port = free_port()
    register_platform(client, tokens, platform, f"http://127.0.0.1:{port}/webhook", signing)
    platform.server = ServerThread(platform.app(), port).start()
    by_csv = make_terminal()
    maker = ed25519.Ed25519PrivateKey.generate()
    pem = maker.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    ok(
        client.post(
            "/v1/keysync/manufacturer-keys",
            headers=auth(tokens["admin"]),
            json={"kid": "m", "manufacturer": "Maker", "public_key_pem": pem.decode()},
        ),
        201,
    )
    import_pem = ok(client.get("/v1/keysync/import-key", headers=auth(tokens["manufacturer"])))
    import_key = load_pem_public_key(import_pem["public_key_pem"].encode())
    assert isinstance(import_key, x25519.X25519PublicKey)
    by_manifest = M2mTerminal.factory(tmp_path / "t-m", "T-M", "+8613800138000", ["meter-app"])
    report = ok(
        client.put(
            "/v1/keysync/imports/manifest",
            headers={
                **auth(tokens["manufacturer"]),
                "Content-Type": "application/x-keysync-manifest",
            },
            content=by_manifest.manifest_line(maker, kid="m", import_key=import_key) + "\n",
        )
    )
    assert report["accepted"] == 1
    ok(
        client.post(
            "/v1/keysync/registrations",
            headers=auth(tokens["operator"]),
            json={"mdn": by_manifest.mdn, "application_ids": ["meter-app"]},
        )
    )
    for terminal in (by_csv, by_manifest):
        assert send_sms(client, terminal, terminal.next_request().to_text()).status_code == 200
    drain(worker(context))
    received = {k.key_id: k.key for k in platform.keys.all()}
    assert received == {t.keys[0].key_id: t.keys[0].key for t in (by_csv, by_manifest)}
