"""The one client every management verb uses: the HTTP API, remote or in process.

:class:`ApiClient` wraps an ``httpx.Client``. Remote, it talks to ``--server`` with a token
(:mod:`trustfleet.kit.credentials`) over TLS verified against ``--ca-file`` or the system's
CAs. Local, it is Starlette's test transport over the app built from the data directory,
wrapped by :func:`trustfleet.server.local.in_process`: the same routes, use cases, checks
and audit records, as the local principal (actor ``cli``). Either way an error answer
(problem+json) becomes :class:`ApiProblem` and a transport failure :class:`Unreachable`,
each printed by the CLI as one line with its code.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx

from trustfleet import __version__
from trustfleet.errors import TrustfleetError

CONNECT_SECONDS = 10
READ_SECONDS = 300  # a 100,000-row import answers after its transaction
LOCAL_BASE_URL = "http://trustfleet.local"

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERNAL = 4


class CliError(TrustfleetError):
    """An error the CLI finds itself; ``exit_code`` is its class of failure."""

    exit_code: ClassVar[int] = EXIT_USAGE
    status = 400


class UsageProblem(CliError):
    code = "usage-error"
    title = "The command line is not valid"


class InvalidServerUrl(UsageProblem):
    code = "invalid-server-url"
    title = "The server URL is not an http:// or https:// URL"


class NoToken(UsageProblem):
    code = "no-token"
    title = "No API token for this server"


class FileUnreadable(UsageProblem):
    code = "file-unreadable"
    title = "A file named on the command line cannot be read"


class Unreachable(CliError):
    code = "server-unreachable"
    status = 503
    exit_code = EXIT_UNREACHABLE
    title = "The server cannot be reached"


class TlsFailed(Unreachable):
    code = "tls-failed"
    title = "The TLS handshake with the server failed"


class TlsUntrusted(Unreachable):
    code = "tls-untrusted"
    title = "The server's certificate is not trusted"


class ApiProblem(TrustfleetError):
    """A problem+json answer: the server's ``code``, ``detail`` and HTTP status."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, **({"hint": hint} if hint else {}))
        self.problem_status = status
        self.problem_code = code


def check_server_url(url: str) -> str:
    """``url`` without its trailing slash, if it is an http:// or https:// URL with a host."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        hint = f"write http://{url} (or https:// for a TLS server)" if "://" not in url else None
        raise InvalidServerUrl(f"--server {url!r} is not an http:// or https:// URL", hint=hint)
    if parts.query or parts.fragment:
        raise InvalidServerUrl(f"--server {url!r} has a query or fragment: give the base URL")
    return url.strip().rstrip("/")


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify servers against ``ca_file`` (PEM), else against the system's CAs."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise FileUnreadable(f"--ca-file {ca_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise FileUnreadable(
            f"--ca-file {ca_file} is not a readable PEM CA certificate ({exc})"
        ) from None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable(exc: httpx.TransportError, url: str | None = None) -> Unreachable:
    """The one-line error of a request that got no HTTP answer."""
    where = url
    with contextlib.suppress(RuntimeError):
        where = where or str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
    where = where or "the server"
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "verification failed"
            return TlsUntrusted(
                f"the certificate of {where} is not trusted: {reason}",
                hint="give --ca-file FILE (or TRUSTFLEET_CACERT) naming the CA that issued it",
            )
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or str(cause)
            return TlsFailed(
                f"the TLS handshake with {where} failed ({reason})",
                hint="if that server speaks plain HTTP, use http:// instead of https://",
            )
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            host = urlsplit(where).hostname or where
            return Unreachable(f"cannot resolve the host name {host!r} of {where}")
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return Unreachable(
                f"cannot connect to {where}: connection refused",
                hint="is `trustfleet serve` running there? check the host and the port",
            )
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(f"no answer from {where} in time ({type(exc).__name__})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return Unreachable(
            f"{where} closed the connection without an HTTP answer",
            hint="if that server uses TLS, use https:// instead of http://",
        )
    return Unreachable(f"cannot reach {where}: {exc or type(exc).__name__}")


def problem_of(response: httpx.Response, *, local: bool, where: str) -> ApiProblem:
    """The :class:`ApiProblem` of an error answer (problem+json, or anything else)."""
    try:
        body = response.json()
        code, detail = str(body["code"]), str(body.get("detail") or body.get("title") or "")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()
        return ApiProblem(
            response.status_code,
            f"http-{response.status_code}",
            f"{where} answered HTTP {response.status_code}"
            + (f": {text[0][:200]}" if text else "")
            + " (not a trustfleet server?)",
        )
    errors = body.get("errors")
    if code == "invalid-request" and isinstance(errors, list) and errors:
        parts = []
        for error in errors[:5]:
            loc = [str(p) for p in error.get("loc", []) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', '')}")
        detail = "; ".join(parts)
    hint = None
    if response.status_code == 401 and not local:
        hint = (
            "the server refused the token: set TRUSTFLEET_TOKEN or run"
            f" `trustfleet login --server {where}`"
        )
    elif response.status_code == 500 and code == "internal-error" and local:
        hint = "run again with --debug to see the server's traceback"
    return ApiProblem(response.status_code, code, detail, hint)


class ApiClient:
    """JSON over HTTP to the API; error answers raise :class:`ApiProblem`, transport
    failures :class:`Unreachable`. ``http`` is the underlying client (device emulators
    run their protocol over it)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        where: str,
        local: bool,
        closer: Callable[[], object] | None = None,
    ) -> None:
        self.http = http
        self.where = where
        self.local = local
        self._closer = closer or http.close

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(exc, self.where) from exc
        return self.checked(response)

    def checked(self, response: httpx.Response) -> httpx.Response:
        """``response`` if it is not an error answer; else its :class:`ApiProblem`, raised."""
        if response.status_code >= 400:
            raise problem_of(response, local=self.local, where=self.where)
        return response

    def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=query).json()

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path).content

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        if json is not None:
            kwargs["json"] = json
        return self.request("POST", path, **kwargs).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def close(self) -> None:
        self._closer()


def remote_client(server: str, *, token: str | None, ca_file: Path | None) -> ApiClient:
    """A client of the server at ``server`` (checked), with ``token`` if given."""
    base = check_server_url(server)
    headers = {"User-Agent": f"trustfleet-cli/{__version__}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    verify = tls_context(ca_file) if base.lower().startswith("https://") else True
    http = httpx.Client(
        base_url=base,
        headers=headers,
        verify=verify,
        timeout=httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS),
        follow_redirects=False,
    )
    return ApiClient(http, where=base, local=False)


def local_client(app: Any) -> ApiClient:
    """A client of ``app`` (an ASGI app already wrapped for in-process calls)."""
    with warnings.catch_warnings():  # starlette's notice about its httpx-based client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    http = TestClient(app, base_url=LOCAL_BASE_URL, raise_server_exceptions=False)
    http.__enter__()  # one event loop thread for every call of this process
    return ApiClient(
        http,
        where="the local data directory",
        local=True,
        closer=lambda: http.__exit__(None, None, None),
    )
