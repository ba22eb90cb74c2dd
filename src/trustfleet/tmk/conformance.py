"""``trustfleet tmk conformance``: a scripted series of TMK downloads against a key server
(directly, or through the gateway a vendor's terminals talk to), with the negative cases,
and a pass/fail report a vendor can attach to a certification request.

The terminals are reference terminals (:class:`~trustfleet.tmk.terminal.PosTerminal`) made
for the run in a temporary directory and registered with the manufacturer's token; each
check uses its own terminal, so the checks do not depend on each other. What each check
sends and expects is in docs/tmk.md, "Conformance". Tokens come from a file or from the
environment (:func:`load_tokens`), never from the command line.

Checks that change the key server beyond its test terminals need the token that allows
it and are skipped without it: the operator's (rotations, revoking the test terminals at
the end) and the administrator's (revoking the work certificate, which installs a new
one: run that only against a test server).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustfleet.crypto import algorithm_of, suite_for_algorithm
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.errors import InvalidInput
from trustfleet.tmk.errors import TmkError, TmkServerRefused
from trustfleet.tmk.protocol import (
    PROTOCOL_V1,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    DownloadRequest,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalProof,
    TerminalSession,
    suite_for_terminal_key,
    transport_info,
)
from trustfleet.tmk.terminal import KSRCRT_CRL_PATH, HttpTransport, PosTerminal
from trustfleet.wire import utcnow

Outcome = Literal["pass", "fail", "skip"]
ROLES = ("device-gateway", "manufacturer", "operator", "admin")
REQUIRED_ROLES = ("device-gateway", "manufacturer")
#: where each role's token is read from when no token file is given
TOKEN_VARIABLES = {
    "device-gateway": "TRUSTFLEET_TMK_GATEWAY_TOKEN",
    "manufacturer": "TRUSTFLEET_TMK_MANUFACTURER_TOKEN",
    "operator": "TRUSTFLEET_TMK_OPERATOR_TOKEN",
    "admin": "TRUSTFLEET_TMK_ADMIN_TOKEN",
}
SUITES = {
    "p256": KeyAlgorithm.EC_P256,
    "rsa-2048": KeyAlgorithm.RSA_2048,
    "rsa-3072": KeyAlgorithm.RSA_3072,
    "sm2": KeyAlgorithm.SM2,
}
TIMEOUT_SECONDS = 30
_DOWNLOADS = "/v1/tmk/downloads"
_TMK_SIZES = {KeyAlgorithm.AES_128: 16, KeyAlgorithm.AES_256: 32, KeyAlgorithm.TDES: 16}


# =====================================================================================
# Tokens: the one place they are read (a file or the environment, never argv)
# =====================================================================================


def load_tokens(path: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The API tokens of the run by role: from ``path`` (a JSON object, role -> token) if
    given, else from the :data:`TOKEN_VARIABLES`. The device gateway's and the
    manufacturer's are required."""
    if path is not None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read the token file {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise InvalidInput("the token file must hold a JSON object of role -> token")
        tokens = {role: str(loaded[role]) for role in ROLES if loaded.get(role)}
    else:
        env = os.environ if environ is None else environ
        tokens = {role: env[name] for role, name in TOKEN_VARIABLES.items() if env.get(name)}
    missing = [role for role in REQUIRED_ROLES if role not in tokens]
    if missing:
        where = str(path) if path else ", ".join(TOKEN_VARIABLES[r] for r in missing)
        raise InvalidInput(f"no {' or '.join(missing)} token (from {where})")
    return tokens


# =====================================================================================
# The report
# =====================================================================================


@dataclass(frozen=True)
class CheckResult:
    name: str
    suite: str
    expected: str
    got: str
    outcome: Outcome
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "suite": self.suite,
            "expected": self.expected,
            "got": self.got,
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass
class Report:
    server: str
    api: str
    started_at: datetime
    finished_at: datetime | None = None
    results: list[CheckResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {o: sum(r.outcome == o for r in self.results) for o in ("pass", "fail", "skip")}

    @property
    def passed(self) -> bool:
        return self.counts["fail"] == 0 and self.counts["pass"] > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "trustfleet-tmk-conformance-v1",
            "protocol_versions": sorted(PROTOCOL_VERSIONS),
            "server": self.server,
            "api": self.api,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "passed": self.passed,
            "summary": self.counts,
            "results": [r.to_dict() for r in self.results],
        }


class _Failed(Exception):
    def __init__(self, got: str, detail: str = "") -> None:
        super().__init__(got)
        self.got = got
        self.detail = detail


class _Skipped(Exception):
    pass


def _answer(response: httpx.Response) -> str:
    """What a response says, for the report: ``200``, ``409 tmk-out-of-order``..."""
    if response.status_code < 400:
        return str(response.status_code)
    try:
        code = str(response.json().get("code", ""))
    except ValueError:
        code = ""
    return f"{response.status_code} {code}".strip()


def _expect(response: httpx.Response, status: int, code: str | None = None) -> str:
    got = _answer(response)
    wanted = f"{status} {code}" if code else str(status)
    if got != wanted:
        raise _Failed(got, response.text[:200] if response.status_code >= 400 else "")
    return got


def _expect_terminal_refusal(run: Callable[[], Any], code: str) -> str:
    """The reference terminal must refuse with ``code``."""
    try:
        run()
    except TmkError as exc:
        if exc.code != code:
            raise _Failed(f"terminal: {exc.code}", exc.message[:200]) from None
        return f"terminal: {exc.code}"
    raise _Failed("terminal: accepted")


# =====================================================================================
# The run
# =====================================================================================


class _Api:
    """Requests to the key server (or the gateway) with one role's token."""

    def __init__(self, client: httpx.Client, token: str | None) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, path: str, body: bytes | dict[str, Any] | None = None) -> httpx.Response:
        if isinstance(body, dict):
            return self._client.post(path, json=body, headers=self._headers)
        headers = {**self._headers, "Content-Type": "application/json"}
        return self._client.post(path, content=body or b"", headers=headers)

    def get(self, path: str) -> httpx.Response:
        return self._client.get(path, headers=self._headers)


@dataclass
class _Download:
    """One download driven step by step by a reference terminal."""

    terminal: PosTerminal
    session: TerminalSession
    challenge: ServerChallenge
    challenge_answer: httpx.Response

    @property
    def base(self) -> str:
        return f"{_DOWNLOADS}/{self.challenge.session_id}"


class Conformance:
    """The checks against one key server. ``server`` is where terminals send the download
    steps (the key server, or a gateway in front of it); ``api`` the key server's API for
    everything else (defaults to ``server``)."""

    def __init__(
        self,
        server: str,
        tokens: Mapping[str, str],
        *,
        api: str | None = None,
        suites: tuple[str, ...] = tuple(SUITES),
        wait_for_expiry: bool = True,
        workdir: Path | None = None,
        progress: Callable[[CheckResult], None] | None = None,
    ) -> None:
        unknown = [s for s in suites if s not in SUITES]
        if unknown or not suites:
            raise InvalidInput(f"suites are among {', '.join(SUITES)}")
        self._server_url = server.rstrip("/")
        self._api_url = (api or server).rstrip("/")
        self._tokens = dict(tokens)
        self._suites = suites
        self._wait = wait_for_expiry
        self._workdir = workdir
        self._progress = progress
        self._run_id = secrets.token_hex(3).upper()
        self._count = 0
        self._terminals: list[str] = []
        self._root_pem = b""

    # -- running -------------------------------------------------------------------------

    def run(self) -> Report:
        report = Report(self._server_url, self._api_url, utcnow())
        with (
            httpx.Client(base_url=self._server_url, timeout=TIMEOUT_SECONDS) as device,
            httpx.Client(base_url=self._api_url, timeout=TIMEOUT_SECONDS) as api,
            self._directory() as directory,
        ):
            self._dir = directory
            self._gateway = _Api(device, self._tokens["device-gateway"])
            self._transport = HttpTransport(device, self._tokens["device-gateway"])
            self._public = _Api(api, None)
            self._roles = {role: _Api(api, token) for role, token in self._tokens.items()}
            for name, suite, expected, check in self._checks():
                report.results.append(self._run_check(name, suite, expected, check))
                if self._progress:
                    self._progress(report.results[-1])
        report.finished_at = utcnow()
        return report

    @contextmanager
    def _directory(self) -> Iterator[Path]:
        if self._workdir is not None:
            self._workdir.mkdir(parents=True, exist_ok=True)
            yield self._workdir
            return
        with tempfile.TemporaryDirectory(prefix="tmk-conformance-") as name:
            yield Path(name)

    def _run_check(
        self, name: str, suite: str, expected: str, check: Callable[[], str]
    ) -> CheckResult:
        try:
            got = check()
        except _Skipped as skipped:
            return CheckResult(name, suite, expected, "-", "skip", str(skipped))
        except _Failed as failed:
            return CheckResult(name, suite, expected, failed.got, "fail", failed.detail)
        except (TmkError, InvalidInput) as exc:
            return CheckResult(name, suite, expected, exc.code, "fail", exc.message[:300])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return CheckResult(name, suite, expected, type(exc).__name__, "fail", str(exc)[:300])
        return CheckResult(name, suite, expected, got, "pass")

    def _checks(self) -> Iterator[tuple[str, str, str, Callable[[], str]]]:
        """Each check: its name, the suite of its terminal, what is expected, and itself.
        The checks that need one terminal use the first suite asked for."""
        first = self._suites[0]
        yield "key-server-identity", "-", "KSRCRT and its CRL", self._identity
        for suite in self._suites:
            yield "download", suite, "TMK active, KCVs agree", partial(self._download, suite)
        checks: list[tuple[str, str, Callable[[str], str]]] = [
            (
                "download-v1",
                "a version 1 terminal: TMK active (or 400 tmk-unsupported-version)",
                self._download_v1,
            ),
            ("tmk-algorithms", "aes-256, then tdes TMK after rotate-tmk", self._algorithms),
            ("retried-proof", "the same delivery, byte for byte", self._retried_proof),
            ("retried-confirmation", "the same activation", self._retried_confirmation),
            ("another-proof", "409 tmk-out-of-order, download unharmed", self._another_proof),
            ("wrong-root", "terminal: tmk-untrusted-server-certificate", self._wrong_root),
            ("tampered-challenge", "terminal: tmk-bad-server-signature", self._tampered_challenge),
            (
                "downgrade",
                "terminal: tmk-version-mismatch, then tmk-bad-server-signature",
                self._downgrade,
            ),
            (
                "forged-delivery",
                "terminal: tmk-bad-delivery-signature, no TMK installed",
                self._forged_delivery,
            ),
            ("tampered-ticket", "403 tmk-invalid-ticket", self._tampered_ticket),
            ("cloned-terminal", "403 tmk-bad-terminal-proof", self._cloned_terminal),
            ("bad-confirmation", "403 tmk-bad-confirmation, then 409", self._bad_confirmation),
            (
                "expired-at-terminal",
                "terminal: tmk-session-expired",
                self._expired_at_terminal,
            ),
            ("expired-at-server", "410 tmk-session-expired", self._expired_at_server),
            ("wrong-suite", "400 tmk-unsupported-suite", self._wrong_suite),
            ("download-not-allowed", "409 tmk-download-not-allowed", self._not_allowed),
            (
                "revoked-work-certificate",
                "terminal: tmk-revoked-server-certificate; 403 tmk-invalid-ticket",
                self._revoked_work_certificate,
            ),
        ]
        for name, expected, check in checks:
            yield name, first, expected, partial(check, first)
        yield "unknown-terminal", "-", "404 tmk-unknown-terminal", self._unknown_terminal
        yield "malformed-message", "-", "400 tmk-malformed-message", self._malformed
        yield "revoked-terminal", "-", "403 tmk-terminal-revoked", self._revoked_terminals

    # -- helpers -------------------------------------------------------------------------

    def _role(self, role: str) -> _Api:
        api = self._roles.get(role)
        if api is None:
            raise _Skipped(f"needs the {role} token")
        return api

    def _terminal(self, suite: str, *, register: bool = True, sn: str | None = None) -> PosTerminal:
        """A new reference terminal (registered with the manufacturer's token)."""
        if not self._root_pem:
            self._identity()
        self._count += 1
        sn = sn or f"CONF-{self._run_id}-{suite.upper()}-{self._count:03d}"
        directory = self._dir / f"terminal-{self._count:03d}"
        record = PosTerminal.factory(
            directory, sn, SUITES[suite], model="conformance", root_pem=self._root_pem
        )
        if register:
            body = {"sn": sn, "model": "conformance", "public_key": record.public_key_pem}
            answer = self._role("manufacturer").post("/v1/tmk/terminals", body)
            if answer.status_code != 201:
                raise _Failed(f"register: {_answer(answer)}", answer.text[:200])
            self._terminals.append(sn)
        return PosTerminal.open(directory)

    def _crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        answer = self._public.get(KSRCRT_CRL_PATH)
        if answer.status_code != 200:
            raise _Failed(f"CRL: {_answer(answer)}")
        return (x509.load_der_x509_crl(answer.content),)

    def _session(
        self,
        terminal: PosTerminal,
        *,
        roots: tuple[x509.Certificate, ...] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> TerminalSession:
        trust = ServerTrust(terminal.roots if roots is None else roots, self._crls())
        return TerminalSession(terminal.scm, trust, clock=clock)

    def _start(self, terminal: PosTerminal, **session: Any) -> _Download:
        run = self._session(terminal, **session)
        answer = self._gateway.post(_DOWNLOADS, run.start().to_json())
        _expect(answer, 200)
        return _Download(terminal, run, ServerChallenge.from_json(answer.content), answer)

    def _prove(self, download: _Download) -> tuple[bytes, httpx.Response]:
        proof = download.session.receive_challenge(download.challenge).to_json()
        return proof, self._gateway.post(f"{download.base}/proof", proof)

    def _finish(self, download: _Download, delivery: httpx.Response) -> httpx.Response:
        _expect(delivery, 200)
        confirmation = download.session.receive_delivery(KeyDelivery.from_json(delivery.content))
        answer = self._gateway.post(f"{download.base}/confirm", confirmation.to_json())
        _expect(answer, 200)
        self._check_active(download.terminal)
        return answer

    def _check_active(self, terminal: PosTerminal) -> str:
        """The server's active TMK is the one in the terminal."""
        view = self._role("manufacturer").get(f"/v1/tmk/terminals/{terminal.sn}")
        _expect(view, 200)
        active = view.json().get("active_tmk") or {}
        mine = terminal.scm.tmk_kcv.hex().upper()
        if active.get("kcv") != mine:
            raise _Failed(f"server KCV {active.get('kcv')}", f"the terminal holds {mine}")
        return f"active, KCV {mine}"

    def _abort(self, download: _Download, code: str) -> None:
        """Report the terminal's refusal with the ticket, and see the ticket is spent."""
        report = {"code": code, "ticket": base64.b64encode(download.challenge.ticket).decode()}
        _expect(self._gateway.post(f"{download.base}/abort", report), 200)

    # -- the checks ----------------------------------------------------------------------

    def _identity(self) -> str:
        answer = self._public.get("/v1/tmk/identity")
        if answer.status_code == 404 and "admin" in self._roles:
            answer = self._roles["admin"].post("/v1/tmk/identity")
        _expect(answer, 200)
        self._root_pem = str(answer.json()["ksrcrt_pem"]).encode()
        root = x509.load_pem_x509_certificate(self._root_pem)
        crl = self._crls()[0]
        if not crl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
            raise _Failed("CRL not signed by KSRCRT")
        return f"KSRCRT {root.subject.rfc4514_string()}, CRL valid"

    def _download(self, suite: str) -> str:
        terminal = self._terminal(suite)
        result = terminal.download(self._transport, crls=self._crls())
        return f"{result.algorithm.value}: " + self._check_active(terminal)

    def _download_v1(self, suite: str) -> str:
        """Terminals of version 1 keep working, unless the server is set to refuse them
        (``tmk_min_protocol_version`` 2): both pass, the report says which."""
        terminal = self._terminal(suite)
        try:
            result = terminal.download(self._transport, crls=self._crls(), version=PROTOCOL_V1)
        except TmkServerRefused as refused:
            if refused.remote_code != "tmk-unsupported-version":
                raise _Failed(f"{refused.http_status} {refused.remote_code}") from None
            return f"{refused.http_status} tmk-unsupported-version: the server refuses version 1"
        return f"v1, {result.algorithm.value}: " + self._check_active(terminal)

    def _algorithms(self, suite: str) -> str:
        operator = self._role("operator")
        terminal = self._terminal(suite)
        transport = self._transport
        terminal.download(transport, crls=self._crls())
        got = []
        for algorithm in ("aes-256", "tdes"):
            answer = operator.post(
                f"/v1/tmk/terminals/{terminal.sn}/rotate-tmk", {"algorithm": algorithm}
            )
            _expect(answer, 200)
            result = terminal.download(transport, crls=self._crls())
            if result.algorithm.value != algorithm:
                raise _Failed(result.algorithm.value, f"asked for {algorithm}")
            self._check_active(terminal)
            got.append(algorithm)
        return " and ".join(got) + " active"

    def _retried_proof(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        proof, first = self._prove(download)
        _expect(first, 200)
        again = self._gateway.post(f"{download.base}/proof", proof)
        _expect(again, 200)
        if again.content != first.content:
            raise _Failed("another delivery", "a repeated proof must get the same bytes")
        self._finish(download, again)
        late = self._gateway.post(f"{download.base}/proof", proof)
        _expect(late, 200)
        if late.content != first.content:
            raise _Failed("another delivery after completion")
        return "200, identical (before and after the confirmation)"

    def _retried_confirmation(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        _, delivery = self._prove(download)
        first = self._finish(download, delivery)
        confirmation = first.request.content
        again = self._gateway.post(f"{download.base}/confirm", confirmation)
        _expect(again, 200)
        if again.content != first.content:
            raise _Failed("another activation", again.text[:200])
        self._check_active(download.terminal)
        return "200, identical; TMK active"

    def _another_proof(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        proof, delivery = self._prove(download)
        _expect(delivery, 200)
        forged = TerminalProof.from_json(proof)
        other = replace(forged, signature=forged.signature[:-1] + bytes([forged.signature[-1] ^ 1]))
        got = _expect(
            self._gateway.post(f"{download.base}/proof", other.to_json()), 409, "tmk-out-of-order"
        )
        self._finish(download, delivery)
        return got + "; the download completed"

    def _wrong_root(self, suite: str) -> str:
        terminal = self._terminal(suite)
        download = self._start(terminal, roots=(_foreign_root(),))
        got = _expect_terminal_refusal(
            lambda: download.session.receive_challenge(download.challenge),
            "tmk-untrusted-server-certificate",
        )
        self._abort(download, "tmk-untrusted-server-certificate")
        return got + "; abort 200"

    def _tampered_challenge(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        rnd2 = bytearray(download.challenge.rnd2)
        rnd2[0] ^= 1
        tampered = replace(download.challenge, rnd2=bytes(rnd2))
        got = _expect_terminal_refusal(
            lambda: download.session.receive_challenge(tampered), "tmk-bad-server-signature"
        )
        self._abort(download, "tmk-bad-server-signature")
        return got + "; abort 200"

    def _downgrade(self, suite: str) -> str:
        """Someone on the path rewrites a version 2 request to version 1 (the request is
        not signed): the terminal refuses the version 1 challenge, and the same challenge
        relabelled as version 2 fails TBS1, whose label names the version it was signed
        in."""
        terminal = self._terminal(suite)
        session = self._session(terminal)
        request = session.start()
        if request.version == PROTOCOL_V1:
            raise _Skipped("the reference terminal speaks version 1")
        answer = self._gateway.post(_DOWNLOADS, replace(request, version=PROTOCOL_V1).to_json())
        if _answer(answer) == "400 tmk-unsupported-version":
            return "server: 400 tmk-unsupported-version (it refuses version 1)"
        _expect(answer, 200)
        download = _Download(terminal, session, ServerChallenge.from_json(answer.content), answer)
        if download.challenge.version != PROTOCOL_V1:
            raise _Failed(f"a version {download.challenge.version} challenge to a v1 request")
        got = _expect_terminal_refusal(
            lambda: session.receive_challenge(download.challenge), "tmk-version-mismatch"
        )
        relabelled = replace(download.challenge, version=request.version)
        again = self._same_request(download)
        got += ", then " + _expect_terminal_refusal(
            lambda: again.receive_challenge(relabelled), "tmk-bad-server-signature"
        )
        self._abort(download, "tmk-version-mismatch")
        return got + "; abort 200"

    def _forged_delivery(self, suite: str) -> str:
        """Someone on the path replaces the delivery with a TMK of their own, wrapped to
        the terminal's public key with the right transport info and KCV (all public) and
        the genuine delivery's signature: the terminal refuses it and installs nothing."""
        download = self._start(self._terminal(suite))
        _, answer = self._prove(download)
        _expect(answer, 200)
        genuine = KeyDelivery.from_json(answer.content)
        scm = download.terminal.scm
        forged, _ = forge_delivery(
            genuine,
            download.challenge,
            sn=scm.sn,
            terminal_key=scm.public_key,
            kem_key=scm.kem_public_key,
        )
        got = _expect_terminal_refusal(
            lambda: download.session.receive_delivery(forged), "tmk-bad-delivery-signature"
        )
        if scm.has_tmk:
            raise _Failed("terminal: a TMK was installed")
        self._abort(download, "tmk-bad-delivery-signature")
        return got + ", no TMK installed; abort 200"

    def _tampered_ticket(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        proof = download.session.receive_challenge(download.challenge)
        ticket = bytearray(proof.ticket)
        ticket[-1] ^= 1
        tampered = replace(proof, ticket=bytes(ticket)).to_json()
        got = _expect(
            self._gateway.post(f"{download.base}/proof", tampered), 403, "tmk-invalid-ticket"
        )
        self._finish(download, self._gateway.post(f"{download.base}/proof", proof.to_json()))
        return got + "; the genuine proof then completed the download"

    def _cloned_terminal(self, suite: str) -> str:
        victim = self._terminal(suite)
        clone = self._terminal(suite, register=False, sn=victim.sn)
        download = self._start(clone)
        _, answer = self._prove(download)
        return _expect(answer, 403, "tmk-bad-terminal-proof")

    def _bad_confirmation(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        _, delivery = self._prove(download)
        _expect(delivery, 200)
        genuine = download.session.receive_delivery(KeyDelivery.from_json(delivery.content))
        forged = replace(genuine, mac=bytes(len(genuine.mac)))
        got = _expect(
            self._gateway.post(f"{download.base}/confirm", forged.to_json()),
            403,
            "tmk-bad-confirmation",
        )
        late = self._gateway.post(f"{download.base}/confirm", genuine.to_json())
        return got + "; then " + _expect(late, 409, "tmk-out-of-order")

    def _expired_at_terminal(self, suite: str) -> str:
        download = self._start(self._terminal(suite))
        late = download.challenge.expires_at + timedelta(seconds=1)
        seen_late = self._same_request(download, clock=lambda: late)
        return _expect_terminal_refusal(
            lambda: seen_late.receive_challenge(download.challenge), "tmk-session-expired"
        )

    def _same_request(self, download: _Download, **session: Any) -> TerminalSession:
        """The terminal role again, at the point where it sent ``download``'s request (the
        same rnd1): to see the same challenge at another time or with other CRLs."""
        trust = ServerTrust(download.terminal.roots, self._crls())
        rnd1 = download.challenge.rnd1
        again = TerminalSession(download.terminal.scm, trust, random=lambda _: rnd1, **session)
        again.start()
        return again

    def _expired_at_server(self, suite: str) -> str:
        if not self._wait:
            raise _Skipped("--no-wait-for-expiry")
        download = self._start(self._terminal(suite))
        proof = download.session.receive_challenge(download.challenge)
        server_now = _server_time(download.challenge_answer)
        wait = (download.challenge.expires_at - server_now).total_seconds() + 1
        time.sleep(max(wait, 0))
        answer = self._gateway.post(f"{download.base}/proof", proof.to_json())
        return _expect(answer, 410, "tmk-session-expired") + f" after {max(wait, 0):.0f} s"

    def _unknown_terminal(self) -> str:
        request = DownloadRequest(
            sn=f"CONF-{self._run_id}-NOBODY",
            rnd1=secrets.token_bytes(32),
            suite="p256",
            version=PROTOCOL_VERSION,
        )
        return _expect(
            self._gateway.post(_DOWNLOADS, request.to_json()), 404, "tmk-unknown-terminal"
        )

    def _wrong_suite(self, suite: str) -> str:
        terminal = self._terminal(suite)
        other = "gm" if terminal.scm.suite != "gm" else "p256"
        request = DownloadRequest(
            sn=terminal.sn, rnd1=secrets.token_bytes(32), suite=other, version=PROTOCOL_VERSION
        )
        return _expect(
            self._gateway.post(_DOWNLOADS, request.to_json()), 400, "tmk-unsupported-suite"
        )

    def _malformed(self) -> str:
        return _expect(
            self._gateway.post(_DOWNLOADS, b'{"type":"tmk-download-request","v":1}'),
            400,
            "tmk-malformed-message",
        )

    def _not_allowed(self, suite: str) -> str:
        terminal = self._terminal(suite)
        transport = self._transport
        terminal.download(transport, crls=self._crls())
        request = self._session(terminal).start()
        return _expect(
            self._gateway.post(_DOWNLOADS, request.to_json()), 409, "tmk-download-not-allowed"
        )

    def _revoked_work_certificate(self, suite: str) -> str:
        admin = self._role("admin")
        download = self._start(self._terminal(suite))
        proof = download.session.receive_challenge(download.challenge)  # before the revocation
        revoked = admin.post("/v1/tmk/identity/revoke-work-cert", {"reason": "key_compromise"})
        _expect(revoked, 200)
        again = self._same_request(download)  # the same challenge, seen with the new CRL
        got = _expect_terminal_refusal(
            lambda: again.receive_challenge(download.challenge), "tmk-revoked-server-certificate"
        )
        refused = self._gateway.post(f"{download.base}/proof", proof.to_json())
        got += "; " + _expect(refused, 403, "tmk-invalid-ticket")
        fresh = self._terminal(suite)
        fresh.download(self._transport, crls=self._crls())
        return got + "; a new download works under the new certificate"

    def _revoked_terminals(self) -> str:
        operator = self._role("operator")
        for sn in self._terminals:
            _expect(operator.post(f"/v1/tmk/terminals/{sn}/revoke", {"reason": "conformance"}), 200)
        if not self._terminals:
            raise _Skipped("no test terminal was registered")
        request = DownloadRequest(
            sn=self._terminals[0],
            rnd1=secrets.token_bytes(32),
            suite="p256",
            version=PROTOCOL_VERSION,
        )
        got = _expect(
            self._gateway.post(_DOWNLOADS, request.to_json()), 403, "tmk-terminal-revoked"
        )
        return got + f"; {len(self._terminals)} test terminals revoked"


def forge_delivery(
    genuine: KeyDelivery,
    challenge: ServerChallenge,
    *,
    sn: str,
    terminal_key: PublicKey,
    kem_key: PublicKey | None = None,
    tmk: bytes | None = None,
) -> tuple[KeyDelivery, bytes]:
    """What anyone on the terminal's path can make from public values alone: ``genuine``
    with a TMK of their choosing (``tmk``, else random) wrapped to the terminal's key
    (``kem_key``, else ``terminal_key``), bound to the session's transport info, with its
    true KCV. The genuine delivery's signature (version 2) is kept: the attacker has no
    other. Returns the forged delivery and the attacker's TMK."""
    algorithm = genuine.algorithm
    chosen = tmk if tmk is not None else secrets.token_bytes(_TMK_SIZES[algorithm])
    recipient = kem_key or terminal_key
    info = transport_info(
        suite_for_terminal_key(terminal_key),
        sn=sn,
        session_id=challenge.session_id,
        rnd1=challenge.rnd1,
        rnd2=challenge.rnd2,
        algorithm=algorithm,
        version=genuine.version,
    )
    wrapped = suite_for_algorithm(algorithm_of(recipient)).kem_wrap(recipient, chosen, info)
    forged = replace(genuine, wrapped_tmk=wrapped, kcv=kcvs.kcv(algorithm, chosen))
    return forged, chosen


def _server_time(response: httpx.Response) -> datetime:
    """The server's clock from its Date header (the local clock without one)."""
    try:
        return parsedate_to_datetime(response.headers["date"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        return utcnow()


def _foreign_root() -> x509.Certificate:
    """A root CA no terminal trusts: what a server outside the terminal's root shows."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-the-key-server-root")])
    now = utcnow()
    return (
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


__all__ = [
    "TOKEN_VARIABLES",
    "CheckResult",
    "Conformance",
    "Report",
    "forge_delivery",
    "load_tokens",
]
