"""The TMK capability over HTTP: the reference terminal downloads through the API, the TMS
issues working keys, manufacturers import terminals; every refusal is problem+json with
its code, and the TMK appears in clear in no response, log line or database row."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import generate_private_key, public_key_to_der
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import pinblock, tr31
from trustfleet.errors import InvalidInput
from trustfleet.keystore.base import KeyStore
from trustfleet.models import import_all_models
from trustfleet.server.app import create_app
from trustfleet.server.auth import create_token
from trustfleet.server.context import AppContext
from trustfleet.server.models import ROLES
from trustfleet.settings import Settings
from trustfleet.store import Database
from trustfleet.store.audit import AuditRecord, iter_records
from trustfleet.store.engine import Base
from trustfleet.tmk import errors
from trustfleet.tmk.models import DownloadSession, Terminal
from trustfleet.tmk.terminal import HttpTransport, PosTerminal, TmkServerRefused

PAN = "5413330089010434"
IMPORT_LIMIT = 32 * 1024 * 1024


# =====================================================================================
# Fixtures
# =====================================================================================


@pytest.fixture
def min_protocol_version() -> int:
    """The server's ``tmk_min_protocol_version``; tests parametrize it."""
    return 1


@pytest.fixture
def context(
    tmp_path: Path,
    engine: Engine,
    sessions: sessionmaker[Session],
    db: Database,
    keystore: KeyStore,
    min_protocol_version: int,
) -> AppContext:
    """The app's context on the soft store or the PKCS#11 backend (tests/tmk/conftest.py)."""
    settings = Settings(
        data_dir=tmp_path,
        max_import_bytes=IMPORT_LIMIT,
        tmk_min_protocol_version=min_protocol_version,
    )
    return AppContext(settings=settings, db=db, keystore=keystore)


@pytest.fixture
def device_lane() -> bool:
    """Whether the download steps are answered by the device lane (the default) or by their
    FastAPI routes; tests parametrize it to show both answer alike."""
    return True


@pytest.fixture
def client(context: AppContext, device_lane: bool) -> Iterator[TestClient]:
    app = create_app(context, device_lane=device_lane)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tokens(db: Database) -> dict[str, str]:
    return {role: create_token(db, f"test {role}", role)[0] for role in sorted(ROLES)}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


@pytest.fixture
def identity(client: TestClient, tokens: dict[str, str]) -> dict[str, Any]:
    answer = client.post("/v1/tmk/identity", headers=auth(tokens["admin"]))
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


@pytest.fixture
def make_terminal(
    tmp_path: Path, client: TestClient, tokens: dict[str, str], identity: dict[str, Any]
) -> Callable[..., PosTerminal]:
    """Factory, then the manufacturer's import over the API (the record file as made)."""
    counter = iter(range(100))

    def make(
        sn: str = "POS-1",
        algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
        *,
        register: bool = True,
        root_pem: bytes | None = None,
    ) -> PosTerminal:
        directory = tmp_path / f"pos-{next(counter)}"
        root = root_pem or identity["ksrcrt_pem"].encode()
        PosTerminal.factory(directory, sn, algorithm, root_pem=root)
        if register:
            imported = client.post(
                "/v1/tmk/terminals/import",
                content=(directory / "record.ndjson").read_bytes(),
                headers={**auth(tokens["manufacturer"]), "Content-Type": "application/x-ndjson"},
            )
            assert imported.json()["accepted"] == 1, imported.text
        return PosTerminal.open(directory)

    return make


@pytest.fixture
def gateway(client: TestClient, tokens: dict[str, str]) -> HttpTransport:
    return HttpTransport(client, tokens["device-gateway"])


def _audit(sessions: sessionmaker[Session]) -> list[AuditRecord]:
    with sessions() as session:
        return list(iter_records(session))


def _failures(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    return [json.loads(r.details) for r in _audit(sessions) if r.action == "tmk.download_failed"]


def _stage(sessions: sessionmaker[Session], session_id: str) -> str:
    with sessions() as session:
        row = session.get(DownloadSession, session_id)
    assert row is not None
    return row.stage


# =====================================================================================
# Downloads over HTTP
# =====================================================================================


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
@pytest.mark.parametrize(
    "algorithm",
    [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.SM2],
    ids=["p256", "rsa", "gm"],
)
def test_terminal_downloads_its_tmk_over_http(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    algorithm: KeyAlgorithm,
) -> None:
    terminal = make_terminal("POS-HTTP", algorithm)
    result = terminal.download(gateway, crls=[terminal.fetch_crl(gateway)])
    assert terminal.scm.has_tmk and result.kcv == terminal.scm.tmk_kcv
    status = client.get("/v1/tmk/terminals/POS-HTTP", headers=auth(tokens["operator"])).json()
    assert status["active_tmk"]["kcv"] == result.kcv.hex().upper()
    assert status["active_tmk"]["session_id"] == result.session_id
    with pytest.raises(TmkServerRefused) as refused:
        terminal.download(gateway)
    assert refused.value.remote_code == "tmk-download-not-allowed"


def test_aborting_a_completed_download_is_409_and_writes_nothing(
    client: TestClient,
    tokens: dict[str, str],
    sessions: sessionmaker[Session],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
) -> None:
    terminal = make_terminal("POS-DONE")
    result = terminal.download(gateway)
    records = len(_audit(sessions))
    for _ in range(3):
        refused = client.post(
            f"/v1/tmk/downloads/{result.session_id}/abort",
            json={"code": "tmk-kcv-mismatch"},
            headers=auth(tokens["device-gateway"]),
        )
        problem(refused, 409, "tmk-out-of-order")
    assert len(_audit(sessions)) == records
    status = client.get("/v1/tmk/terminals/POS-DONE", headers=auth(tokens["operator"])).json()
    assert status["active_tmk"]["kcv"] == result.kcv.hex().upper()


def test_the_tmk_never_appears_in_clear_in_responses_logs_or_the_database(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    traffic: list[bytes] = []

    def record_request(request: httpx.Request) -> None:
        traffic.append(request.content)

    def record_response(response: httpx.Response) -> None:
        response.read()
        traffic.append(response.content)

    client.event_hooks = {"request": [record_request], "response": [record_response]}
    terminal = make_terminal()
    terminal.download(gateway)
    for usage in ("P0", "D0", "M3"):
        issued = client.post(
            "/v1/tmk/terminals/POS-1/working-keys",
            json={"usage": usage},
            headers=auth(tokens["operator"]),
        ).json()
        terminal.install_working_key(issued["key_block"], usage)
    block = terminal.encrypt_pin("4321", PAN)
    checked = client.post(
        "/v1/tmk/terminals/POS-1/pin-blocks/verify",
        json={"pin_block": block.hex(), "pan": PAN, "pin": "4321"},
        headers=auth(tokens["operator"]),
    )
    assert checked.json() == {"match": True}
    client.get("/v1/tmk/terminals/POS-1", headers=auth(tokens["operator"]))

    tmk = terminal.scm._installed().key  # white box: the secret to search for
    secrets = [tmk] + [_working_key(tmk, b) for b in terminal._load_working_keys().values()]
    blobs = traffic + [r.getMessage().encode() for r in caplog.records] + _database_dump(engine)
    assert len(traffic) > 10 and caplog.records
    for secret in secrets:
        for blob in blobs:
            assert_secret_absent(secret, blob)


def _working_key(tmk: bytes, block: str) -> bytes:
    return tr31.unwrap(tmk, block)[1]


def _database_dump(engine: Engine) -> list[bytes]:
    import_all_models()
    blobs: list[bytes] = []
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(select(table)):
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        blobs.append(bytes(value))
                    else:
                        blobs.append(str(value).encode())
    assert len(blobs) > 100
    return blobs


_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")


def assert_secret_absent(secret: bytes, blob: bytes) -> None:
    """Not raw, not hex (either case), not inside any base64 run of the blob."""
    assert secret not in blob
    assert secret.hex().encode() not in blob.lower()
    for run in _BASE64_RUN.findall(blob):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            for start in range(4):
                chunk = run[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    decoded = decode(chunk)
                except ValueError:
                    continue
                assert secret not in decoded


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_a_proof_replayed_into_another_session_is_refused_over_http(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
) -> None:
    from trustfleet.tmk.protocol import ServerChallenge, ServerTrust, TerminalSession

    headers = {**auth(tokens["device-gateway"]), "Content-Type": "application/json"}
    runs = []
    for sn in ("POS-A", "POS-B"):
        terminal = make_terminal(sn)
        session = TerminalSession(terminal.scm, ServerTrust(terminal.roots))
        answer = client.post(
            "/v1/tmk/downloads", content=session.start().to_json(), headers=headers
        )
        runs.append((session, ServerChallenge.from_json(answer.content)))
    (session_a, challenge_a), (_, challenge_b) = runs
    proof_a = session_a.receive_challenge(challenge_a).to_json()
    replayed = client.post(
        f"/v1/tmk/downloads/{challenge_b.session_id}/proof", content=proof_a, headers=headers
    )
    problem(replayed, 409, "tmk-replay")
    with sessions() as session:  # B's session lives in B's ticket: the replay cannot touch it
        assert session.get(DownloadSession, challenge_b.session_id) is None
    assert _failures(sessions)[-1]["code"] == "tmk-replay"
    genuine = client.post(
        f"/v1/tmk/downloads/{challenge_a.session_id}/proof", content=proof_a, headers=headers
    )
    assert genuine.status_code == 200 and json.loads(genuine.content)["type"] == "tmk-key-delivery"


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_a_gateway_retrying_each_step_gets_byte_identical_answers(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    version: int,
) -> None:
    from trustfleet.tmk.protocol import KeyDelivery, ServerChallenge, ServerTrust, TerminalSession

    terminal = make_terminal("POS-RETRY")
    headers = {**auth(tokens["device-gateway"]), "Content-Type": "application/json"}
    session = TerminalSession(terminal.scm, ServerTrust(terminal.roots), version=version)
    challenge = ServerChallenge.from_json(
        client.post("/v1/tmk/downloads", content=session.start().to_json(), headers=headers).content
    )
    base = f"/v1/tmk/downloads/{challenge.session_id}"
    proof = session.receive_challenge(challenge).to_json()
    deliveries = [client.post(f"{base}/proof", content=proof, headers=headers) for _ in range(3)]
    assert [d.status_code for d in deliveries] == [200] * 3
    assert len({d.content for d in deliveries}) == 1  # in v2 its signature too: it is stored
    assert json.loads(deliveries[0].content)["v"] == version
    confirmation = session.receive_delivery(KeyDelivery.from_json(deliveries[-1].content))
    answers = [
        client.post(f"{base}/confirm", content=confirmation.to_json(), headers=headers)
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200] * 3
    assert len({a.content for a in answers}) == 1
    assert json.loads(answers[0].content)["kcv"] == terminal.scm.tmk_kcv.hex().upper()
    assert _failures(sessions) == []
    status = client.get("/v1/tmk/terminals/POS-RETRY", headers=auth(tokens["operator"])).json()
    assert status["active_tmk"]["kcv"] == terminal.scm.tmk_kcv.hex().upper()


class OnPath:
    """The terminal's network path in someone else's hands: what the terminal sends goes
    through ``up``, what comes back through ``down`` (each given the path and the bytes),
    and every exchange is kept."""

    def __init__(
        self,
        inner: HttpTransport,
        *,
        up: Callable[[str, bytes], bytes] | None = None,
        down: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.inner = inner
        self.up = up or (lambda _path, body: body)
        self.down = down or (lambda _path, body: body)
        self.exchanges: list[tuple[str, bytes, bytes]] = []

    def post(self, path: str, body: bytes) -> bytes:
        sent = self.up(path, body)
        answer = self.down(path, self.inner.post(path, sent))
        self.exchanges.append((path, sent, answer))
        return answer

    def get(self, path: str) -> bytes:
        return self.inner.get(path)

    def messages(self) -> list[dict[str, Any]]:
        """Every protocol message that went either way, in order."""
        found = []
        for path, sent, answer in self.exchanges:
            found.append(json.loads(sent))
            if not path.endswith(("/confirm", "/abort")):
                found.append(json.loads(answer))
        return found


def _rewrite_version(version: int) -> Callable[[str, bytes], bytes]:
    """An ``up`` that rewrites the download request's version (it is not signed)."""

    def up(path: str, body: bytes) -> bytes:
        if path != "/v1/tmk/downloads":
            return body
        return json.dumps({**json.loads(body), "v": version}, sort_keys=True).encode()

    return up


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_both_protocol_versions_download_over_http(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    version: int,
) -> None:
    terminal = make_terminal("POS-V")
    path = OnPath(gateway)
    result = terminal.download(path, crls=[terminal.fetch_crl(gateway)], version=version)
    messages = path.messages()
    assert [m["type"] for m in messages] == [
        "tmk-download-request",
        "tmk-server-challenge",
        "tmk-terminal-proof",
        "tmk-key-delivery",
        "tmk-confirmation",
    ]
    assert {m["v"] for m in messages} == {version}  # the server answered in the request's
    assert ("signature" in messages[3]) == (version == 2)
    status = client.get("/v1/tmk/terminals/POS-V", headers=auth(tokens["operator"])).json()
    assert (
        status["active_tmk"]["kcv"]
        == result.kcv.hex().upper()
        == terminal.scm.tmk_kcv.hex().upper()
    )


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_a_forged_delivery_over_http_is_refused_by_a_v2_terminal_and_reported(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    sessions: sessionmaker[Session],
) -> None:
    from trustfleet.tmk.conformance import forge_delivery
    from trustfleet.tmk.protocol import KeyDelivery, ServerChallenge

    terminal = make_terminal("POS-FORGED")
    seen: dict[str, ServerChallenge] = {}

    def forge(path: str, answer: bytes) -> bytes:
        if path == "/v1/tmk/downloads":
            seen["challenge"] = ServerChallenge.from_json(answer)
        if not path.endswith("/proof"):
            return answer
        forged, _ = forge_delivery(
            KeyDelivery.from_json(answer),
            seen["challenge"],
            sn=terminal.sn,
            terminal_key=terminal.scm.public_key,
        )
        return forged.to_json()

    with pytest.raises(errors.TmkBadDeliverySignature):
        terminal.download(OnPath(gateway, down=forge))
    assert not terminal.scm.has_tmk
    failure = _failures(sessions)[-1]  # reported with /abort: the session and its TMK end
    assert failure["code"] == "tmk-terminal-aborted"
    assert failure["reported_code"] == "tmk-bad-delivery-signature"
    assert _stage(sessions, failure["session_id"]) == "aborted"
    operator = auth(tokens["operator"])
    assert client.get("/v1/tmk/terminals/POS-FORGED", headers=operator).json()["active_tmk"] is None
    result = terminal.download(gateway)  # the path is clean again: a new download works
    status = client.get("/v1/tmk/terminals/POS-FORGED", headers=operator).json()
    assert status["active_tmk"]["kcv"] == result.kcv.hex().upper()


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_a_forged_delivery_over_http_is_installed_by_a_v1_terminal(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
) -> None:
    """Version 1's weakness, end to end: the terminal holds the attacker's TMK; the server
    refuses the confirmation and never activates anything."""
    from trustfleet.crypto.payment.kcv import kcv
    from trustfleet.tmk.conformance import forge_delivery
    from trustfleet.tmk.protocol import KeyDelivery, ServerChallenge

    terminal = make_terminal("POS-V1-FORGED")
    seen: dict[str, ServerChallenge] = {}
    chosen = bytes(range(16))

    def forge(path: str, answer: bytes) -> bytes:
        if path == "/v1/tmk/downloads":
            seen["challenge"] = ServerChallenge.from_json(answer)
        if not path.endswith("/proof"):
            return answer
        genuine = KeyDelivery.from_json(answer)
        forged, _ = forge_delivery(
            genuine,
            seen["challenge"],
            sn=terminal.sn,
            terminal_key=terminal.scm.public_key,
            tmk=chosen,
        )
        return forged.to_json()

    with pytest.raises(TmkServerRefused) as refused:
        terminal.download(OnPath(gateway, down=forge), version=1)
    assert (refused.value.remote_code, refused.value.http_status) == ("tmk-bad-confirmation", 403)
    assert terminal.scm.tmk_kcv == kcv(KeyAlgorithm.AES_128, chosen)
    status = client.get("/v1/tmk/terminals/POS-V1-FORGED", headers=auth(tokens["operator"]))
    assert status.json()["active_tmk"] is None


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_a_request_downgraded_on_the_way_is_refused_by_the_v2_terminal_and_reported(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    sessions: sessionmaker[Session],
) -> None:
    terminal = make_terminal("POS-DOWN")
    path = OnPath(gateway, up=_rewrite_version(1))
    with pytest.raises(errors.TmkVersionMismatch):
        terminal.download(path)
    request, challenge = path.messages()[:2]
    assert (request["v"], challenge["v"]) == (1, 1)  # the server did answer in version 1
    assert not terminal.scm.has_tmk
    failure = _failures(sessions)[-1]
    assert failure["reported_code"] == "tmk-version-mismatch"
    assert _stage(sessions, failure["session_id"]) == "aborted"  # stored from its ticket


@pytest.mark.parametrize("min_protocol_version", [2])
def test_a_server_set_to_version_2_refuses_version_1_requests(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    sessions: sessionmaker[Session],
) -> None:
    terminal = make_terminal("POS-ONLY-V2")
    with pytest.raises(TmkServerRefused) as old:
        terminal.download(gateway, version=1)
    assert (old.value.remote_code, old.value.http_status) == ("tmk-unsupported-version", 400)
    with pytest.raises(TmkServerRefused) as downgraded:
        terminal.download(OnPath(gateway, up=_rewrite_version(1)))
    assert downgraded.value.remote_code == "tmk-unsupported-version"
    assert [f["code"] for f in _failures(sessions)] == ["tmk-unsupported-version"] * 2
    result = terminal.download(gateway)
    assert result.kcv == terminal.scm.tmk_kcv


def test_a_terminal_with_another_sns_key_is_refused_over_http(
    make_terminal: Callable[..., PosTerminal], gateway: HttpTransport
) -> None:
    make_terminal("POS-VICTIM")
    clone = make_terminal("POS-VICTIM", register=False)
    with pytest.raises(TmkServerRefused) as refused:
        clone.download(gateway)
    assert (refused.value.remote_code, refused.value.http_status) == ("tmk-bad-terminal-proof", 403)
    assert not clone.scm.has_tmk


def test_a_terminal_refuses_a_server_outside_its_root_and_reports_it(
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
    sessions: sessionmaker[Session],
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not-the-ksrcrt")])
    foreign_root = _self_signed(other, name)
    terminal = make_terminal(root_pem=foreign_root)
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        terminal.download(gateway)
    assert not terminal.scm.has_tmk
    failure = _failures(sessions)[-1]
    assert failure["code"] == "tmk-terminal-aborted"
    assert failure["reported_code"] == "tmk-untrusted-server-certificate"
    assert _stage(sessions, failure["session_id"]) == "aborted"


def _self_signed(key: ec.EllipticCurvePrivateKey, name: x509.Name) -> bytes:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes

    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


def test_downloads_for_unknown_and_suspended_terminals_have_their_own_codes(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
) -> None:
    with pytest.raises(TmkServerRefused) as unknown:
        make_terminal("POS-GHOST", register=False).download(gateway)
    assert (unknown.value.remote_code, unknown.value.http_status) == ("tmk-unknown-terminal", 404)
    terminal = make_terminal("POS-S")
    operator = auth(tokens["operator"])
    suspended = client.post(
        "/v1/tmk/terminals/POS-S/suspend", json={"reason": "stolen"}, headers=operator
    )
    assert suspended.json()["status"] == "suspended"
    with pytest.raises(TmkServerRefused) as refused:
        terminal.download(gateway)
    assert refused.value.remote_code == "tmk-terminal-suspended"
    client.post("/v1/tmk/terminals/POS-S/reactivate", headers=operator)
    terminal.download(gateway)
    client.post("/v1/tmk/terminals/POS-S/revoke", headers=operator)
    with pytest.raises(TmkServerRefused) as revoked:
        terminal.download(gateway)
    assert revoked.value.remote_code == "tmk-terminal-revoked"
    status = client.get("/v1/tmk/terminals/POS-S", headers=operator).json()
    assert status["status"] == "revoked" and status["active_tmk"] is None


@pytest.mark.parametrize("device_lane", [True, False], ids=["lane", "fastapi"])
def test_malformed_messages_and_unknown_sessions_are_problems(
    client: TestClient, tokens: dict[str, str]
) -> None:
    headers = auth(tokens["device-gateway"])
    problem(
        client.post("/v1/tmk/downloads", content=b"{", headers=headers),
        400,
        "tmk-malformed-message",
    )
    problem(
        client.post(f"/v1/tmk/downloads/{'a' * 32}/confirm", content=b"{}", headers=headers),
        400,
        "tmk-malformed-message",
    )
    problem(
        client.post(f"/v1/tmk/downloads/{'a' * 32}/abort", json={"code": "x"}, headers=headers),
        404,
        "tmk-session-not-found",
    )
    problem(
        client.post("/v1/tmk/downloads", content=b"{}", headers=auth(tokens["operator"])),
        403,
        "forbidden",
    )


# =====================================================================================
# Rotation, working keys, PIN blocks
# =====================================================================================


def test_tms_issues_working_keys_the_terminal_enforces_and_a_pin_block_round_trips(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
) -> None:
    terminal = make_terminal()
    operator = auth(tokens["operator"])
    problem(
        client.post("/v1/tmk/terminals/POS-1/working-keys", json={"usage": "P0"}, headers=operator),
        409,
        "tmk-no-active-tmk",
    )
    terminal.download(gateway)
    problem(
        client.post(
            "/v1/tmk/terminals/POS-1/working-keys",
            json={"usage": "P0"},
            headers=auth(tokens["manufacturer"]),
        ),
        403,
        "forbidden",
    )
    issued = client.post(
        "/v1/tmk/terminals/POS-1/working-keys", json={"usage": "P0"}, headers=operator
    )
    assert issued.status_code == 201, issued.text
    p0 = issued.json()
    assert p0["key_block"].startswith("D") and p0["key_block"][5:9] == "P0AE"
    assert p0["tmk_kcv"] == terminal.scm.tmk_kcv.hex().upper()
    with pytest.raises(tr31.Tr31UsageMismatch):  # the terminal will not use a PIN key as MAC key
        terminal.install_working_key(p0["key_block"], "M3")
    assert terminal.install_working_key(p0["key_block"], "P0").kcv.hex().upper() == p0["kcv"]

    block = terminal.encrypt_pin("1234", PAN)
    verify = "/v1/tmk/terminals/POS-1/pin-blocks/verify"
    right = {"pin_block": block.hex(), "pan": PAN, "pin": "1234"}
    assert client.post(verify, json=right, headers=operator).json() == {"match": True}
    wrong = {**right, "pin": "4321"}
    assert client.post(verify, json=wrong, headers=operator).json() == {"match": False}
    problem(
        client.post(verify, json={**right, "pin": "12"}, headers=operator), 422, "invalid-request"
    )
    problem(client.post(verify, json=right, headers=auth(tokens["admin"])), 403, "forbidden")

    rotated = client.post(
        "/v1/tmk/terminals/POS-1/rotate-tmk", json={"algorithm": "aes-256"}, headers=operator
    )
    assert rotated.json()["rotation_requested"] is True
    result = terminal.download(gateway)
    assert result.algorithm is KeyAlgorithm.AES_256
    status = client.get("/v1/tmk/terminals/POS-1", headers=operator).json()
    assert status["working_keys"] == [] and status["tmk_history"] == 2
    problem(client.post(verify, json=right, headers=operator), 409, "tmk-no-working-key")


# =====================================================================================
# The key server's identity
# =====================================================================================


def test_identity_is_public_rotates_and_revokes_without_touching_terminals(
    client: TestClient,
    tokens: dict[str, str],
    make_terminal: Callable[..., PosTerminal],
    gateway: HttpTransport,
) -> None:
    first = client.get("/v1/tmk/identity").json()  # public
    admin = auth(tokens["admin"])
    rotated = client.post("/v1/tmk/identity/rotate-work-cert", headers=admin).json()
    assert rotated["ksrcrt_pem"] == first["ksrcrt_pem"]
    assert rotated["work_certificate_serial"] != first["work_certificate_serial"]
    terminal = make_terminal()  # preloaded with the same KSRCRT
    terminal.download(gateway, crls=[terminal.fetch_crl(gateway)])

    revoked = client.post(
        "/v1/tmk/identity/revoke-work-cert", json={"reason": "key_compromise"}, headers=admin
    ).json()
    assert revoked["revoked_serial"] == rotated["work_certificate_serial"]
    crl = x509.load_der_x509_crl(client.get(revoked["identity"]["crl_path"]).content)
    assert crl.get_revoked_certificate_by_serial_number(int(revoked["revoked_serial"], 16))
    client.post("/v1/tmk/terminals/POS-1/rotate-tmk", headers=auth(tokens["operator"]))
    terminal.download(gateway, crls=[crl])  # the new work certificate is not on the CRL
    problem(
        client.post("/v1/tmk/identity/rotate-work-cert", headers=auth(tokens["operator"])),
        403,
        "forbidden",
    )


def test_identity_before_initialisation_is_a_404(
    client: TestClient, tokens: dict[str, str]
) -> None:
    problem(client.get("/v1/tmk/identity"), 404, "tmk-identity-not-initialised")
    history = client.get("/v1/tmk/identity/history", headers=auth(tokens["auditor"]))
    problem(history, 404, "tmk-identity-not-initialised")
    cas = client.get("/v1/ca", headers=auth(tokens["admin"])).json()
    assert "tmk-ksrcrt" not in [ca["name"] for ca in cas]  # reading made no CA


def test_identity_history_lists_every_work_certificate(
    client: TestClient, tokens: dict[str, str], identity: dict[str, Any]
) -> None:
    client.post("/v1/tmk/identity/rotate-work-cert", headers=auth(tokens["admin"]))
    history = client.get("/v1/tmk/identity/history", headers=auth(tokens["operator"])).json()
    assert [h["status"] for h in history] == ["retired", "active"]
    assert history[0]["work_certificate_serial"] == identity["work_certificate_serial"]


def test_sweep_is_an_operator_route(client: TestClient, tokens: dict[str, str]) -> None:
    swept = client.post("/v1/tmk/sweep", headers=auth(tokens["operator"]))
    assert swept.json() == {"sessions_aborted": 0, "keys_destroyed": 0}
    problem(client.post("/v1/tmk/sweep", headers=auth(tokens["auditor"])), 403, "forbidden")


def test_pin_checks_take_the_terminals_pan_rule(client: TestClient, tokens: dict[str, str]) -> None:
    body = {"pin_block": "00" * 16, "pin": "1234"}
    verify = "/v1/tmk/terminals/POS-1/pin-blocks/verify"
    for pan in ("41111", "41111111111", "4" * 20):
        too = client.post(verify, json={**body, "pan": pan}, headers=auth(tokens["operator"]))
        problem(too, 422, "invalid-request")
    encrypt, _ = pinblock.ecb_cipher(KeyAlgorithm.AES_128, bytes(16))
    with pytest.raises(InvalidInput, match="12-19"):
        pinblock.format4_encipher(encrypt, "1234", "41111")


# =====================================================================================
# Listing terminals
# =====================================================================================


def test_terminals_are_listed_by_status_and_model_a_page_at_a_time(
    client: TestClient, tokens: dict[str, str], db: Database
) -> None:
    rows = ["sn,model,public_key"]
    for i in range(7):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        rows.append(f"POS-{i},{'A920' if i % 2 else 'S90'},{_b64(key)}")
    imported = client.post(
        "/v1/tmk/terminals/import",
        content="\n".join(rows).encode(),
        headers={**auth(tokens["manufacturer"]), "Content-Type": "text/csv"},
    )
    assert imported.json()["accepted"] == 7
    operator = auth(tokens["operator"])
    client.post("/v1/tmk/terminals/POS-3/suspend", headers=operator)

    def listing(**params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/tmk/terminals", params=query, headers=auth(tokens["auditor"]))
            assert page.status_code == 200, page.text
            body = page.json()
            assert set(body) == {"items", "next_cursor"}
            items += body["items"]
            cursor = body["next_cursor"]
            if cursor is None:
                return items

    everything = listing(limit=3)
    assert [t["sn"] for t in everything] == [f"POS-{i}" for i in range(7)]
    assert set(everything[0]) == {
        "sn", "model", "key_algorithm", "status", "registered_by", "created_at", "updated_at"
    }  # fmt: skip
    assert [t["sn"] for t in listing(model="A920", limit=2)] == ["POS-1", "POS-3", "POS-5"]
    assert [t["sn"] for t in listing(status="suspended")] == ["POS-3"]
    assert [t["sn"] for t in listing(status="active", model="A920")] == ["POS-1", "POS-5"]
    problem(
        client.get("/v1/tmk/terminals", params={"status": "lost"}, headers=operator),
        422,
        "invalid-request",
    )
    audit_cursor = client.get("/v1/audit", params={"limit": 1}, headers=auth(tokens["admin"]))
    wrong = audit_cursor.json()["next_cursor"]
    problem(
        client.get("/v1/tmk/terminals", params={"cursor": wrong}, headers=operator),
        400,
        "invalid-cursor",
    )


# =====================================================================================
# Registry over the API
# =====================================================================================


def _b64(key: Any) -> str:
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {
        "p256": _b64(ec.generate_private_key(ec.SECP256R1()).public_key()),
        "p256b": _b64(ec.generate_private_key(ec.SECP256R1()).public_key()),
        "rsa": _b64(rsa.generate_private_key(65537, 2048).public_key()),
        "sm2": base64.b64encode(
            public_key_to_der(generate_private_key(KeyAlgorithm.SM2).public_key())
        ).decode(),
        "p384": _b64(ec.generate_private_key(ec.SECP384R1()).public_key()),
        "ed25519": _b64(ed25519.Ed25519PrivateKey.generate().public_key()),
        "rsa1024": _b64(rsa.generate_private_key(65537, 1024).public_key()),  # noqa: S505
    }


def _import(client: TestClient, token: str, body: bytes, media: str) -> httpx.Response:
    headers = {**auth(token), "Content-Type": media}
    return client.post("/v1/tmk/terminals/import", content=body, headers=headers)


#: (sn, model, public key name or literal, expected code or None)
ROWS: list[tuple[str, str, str, str | None]] = [
    ("SN-OK-P256", "A920", "p256", None),
    ("SN-OK-RSA", "A920", "rsa", None),
    ("SN-OK-SM2", "N910", "sm2", None),
    ("SN-OK-P256", "A920", "p256", "duplicate-sn"),  # twice in the file
    ("SN-TAKEN", "A920", "p256b", "duplicate-sn"),  # registered before with another key
    ("", "A920", "p256", "missing-field"),
    ("bad sn!", "A920", "p256", "invalid-sn"),
    ("SN-NOKEY", "A920", "", "missing-field"),
    ("SN-LONGMODEL", "M" * 101, "p256", "invalid-model"),
    ("SN-GARBAGE", "A920", "not*base64", "malformed-key"),
    ("SN-NOTAKEY", "A920", base64.b64encode(b"hello world!").decode(), "malformed-key"),
    ("SN-P384", "A920", "p384", "unsupported-algorithm"),
    ("SN-ED25519", "A920", "ed25519", "unsupported-algorithm"),
    ("SN-RSA1024", "A920", "rsa1024", "unsupported-algorithm"),
]


def _rows(keys: dict[str, str]) -> list[tuple[str, str, str, str | None]]:
    return [(sn, model, keys.get(key, key), code) for sn, model, key, code in ROWS]


def _expected(keys: dict[str, str], extra: list[tuple[int, str]]) -> list[tuple[int, str]]:
    expected = [(i, code) for i, (*_, code) in enumerate(_rows(keys), start=1) if code]
    return sorted(expected + extra)


def _csv(rows: list[tuple[str, str, str, str | None]]) -> bytes:
    out = io.StringIO()
    out.write("sn,model,public_key\n")
    for sn, model, key, _ in rows:
        out.write(f"{sn},{model},{key}\n")
    out.write("SN-CELLS,A920,xx,extra-cell\n")
    return out.getvalue().encode()


def _ndjson(rows: list[tuple[str, str, str, str | None]]) -> bytes:
    lines = [json.dumps({"sn": sn, "model": m, "public_key": k}) for sn, m, k, _ in rows]
    lines += ["{not json", "[1, 2]", json.dumps({"sn": 7, "public_key": "x"})]
    return ("\n".join(lines) + "\n").encode()


def _json_array(rows: list[tuple[str, str, str, str | None]]) -> bytes:
    items: list[Any] = [{"sn": sn, "model": m, "public_key": k} for sn, m, k, _ in rows]
    items += ["not an object", {"sn": ["x"], "public_key": "y"}]
    return json.dumps(items).encode()


@pytest.mark.parametrize(
    ("media", "encode", "extra"),
    [
        ("text/csv", _csv, [(15, "malformed-row")]),
        (
            "application/x-ndjson",
            _ndjson,
            [(15, "malformed-row"), (16, "malformed-row"), (17, "malformed-row")],
        ),
        ("application/json", _json_array, [(15, "malformed-row"), (16, "malformed-row")]),
    ],
    ids=["csv", "ndjson", "json"],
)
def test_every_import_error_case_has_its_per_row_code_and_reimport_changes_nothing(
    client: TestClient,
    tokens: dict[str, str],
    keys: dict[str, str],
    sessions: sessionmaker[Session],
    media: str,
    encode: Callable[[list[tuple[str, str, str, str | None]]], bytes],
    extra: list[tuple[int, str]],
) -> None:
    maker = tokens["manufacturer"]
    registered = client.post(
        "/v1/tmk/terminals",
        json={"sn": "SN-TAKEN", "model": "A920", "public_key": keys["p256"]},
        headers=auth(maker),
    )
    assert registered.status_code == 201 and registered.json()["key_algorithm"] == "ec-p256"
    body = encode(_rows(keys))
    report = _import(client, maker, body, media).json()
    assert (report["accepted"], report["unchanged"]) == (3, 0)
    got = sorted((r["row"], r["code"]) for r in report["rejected"])
    assert got == _expected(keys, extra)
    assert report["rows"] == 3 + len(got)
    assert all(isinstance(r["message"], str) and r["message"] for r in report["rejected"])

    again = _import(client, maker, body, media).json()
    assert (again["accepted"], again["unchanged"]) == (0, 3)
    with sessions() as session:
        assert len(session.scalars(select(Terminal)).all()) == 4


def test_import_body_errors_are_problems(
    client: TestClient, tokens: dict[str, str], keys: dict[str, str]
) -> None:
    maker = tokens["manufacturer"]
    problem(
        _import(client, maker, b"serial,key\nA,B\n", "text/csv"), 400, "tmk-invalid-terminal-record"
    )
    problem(
        _import(client, maker, b"sn,public_key\n\xff\xfe\n", "text/csv"),
        400,
        "tmk-invalid-terminal-record",
    )
    problem(_import(client, maker, b"{}", "application/json"), 400, "tmk-invalid-terminal-record")
    problem(_import(client, maker, b"sn,public_key\n", "text/plain"), 415, "unsupported-media-type")
    problem(_import(client, tokens["operator"], b"", "text/csv"), 403, "forbidden")
    single = client.post(
        "/v1/tmk/terminals",
        json={"sn": "SN-X", "public_key": keys["p384"]},
        headers=auth(maker),
    )
    problem(single, 400, "tmk-invalid-terminal-record")
    conflict = client.post(
        "/v1/tmk/terminals", json={"sn": "SN-X", "public_key": keys["p256"]}, headers=auth(maker)
    )
    assert conflict.status_code == 201
    problem(
        client.post(
            "/v1/tmk/terminals", json={"sn": "SN-X", "public_key": keys["rsa"]}, headers=auth(maker)
        ),
        409,
        "tmk-terminal-already-registered",
    )


def test_import_bodies_above_the_import_limit_are_refused(
    context: AppContext, tokens: dict[str, str]
) -> None:
    from dataclasses import replace

    small = replace(context, settings=replace(context.settings, max_import_bytes=100_000))
    with TestClient(create_app(small), raise_server_exceptions=False) as small_client:

        def chunks() -> Iterator[bytes]:
            yield b"sn,public_key\n"
            for i in range(100):
                yield "".join(f"SN-{i}-{j},AAAA\n" for j in range(100)).encode()

        big = small_client.post(
            "/v1/tmk/terminals/import",
            content=chunks(),
            headers={**auth(tokens["manufacturer"]), "Content-Type": "text/csv"},
        )
        problem(big, 413, "body-too-large")
    with context.db.reading() as reads:
        assert reads.all(select(Terminal.sn)) == []  # nothing half-imported


@pytest.mark.slow
def test_a_100000_row_csv_streams_in_one_request(
    client: TestClient, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    pool = [_b64(ec.generate_private_key(ec.SECP256R1()).public_key()) for _ in range(16)]
    rows = 100_000

    def chunks() -> Iterator[bytes]:  # chunked upload: no Content-Length
        yield b"sn,model,public_key\n"
        batch: list[str] = []
        for i in range(rows):
            batch.append(f"POS-{i:06d},A920,{pool[i % len(pool)]}\n")
            if len(batch) == 5000:
                yield "".join(batch).encode()
                batch = []

    headers = {**auth(tokens["manufacturer"]), "Content-Type": "text/csv"}
    report = client.post("/v1/tmk/terminals/import", content=chunks(), headers=headers)
    assert report.status_code == 200, report.text[:500]
    assert report.json() | {"rejected": None} == {
        "rows": rows,
        "accepted": rows,
        "unchanged": 0,
        "rejected": None,
    }
    with sessions() as session:
        assert session.get(Terminal, "POS-099999") is not None
