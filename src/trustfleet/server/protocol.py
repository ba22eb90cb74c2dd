"""The HTTP/1.1 protocol trustfleet's nodes serve with: uvicorn's httptools protocol with
limits that make a hostile connection cost little.

- **Header size.** The request line and headers together may take ``max_header_bytes``.
  The parser (llhttp) streams, but httptools joins a header's pieces into one ``bytes``
  value as they arrive, so without a limit a 128 MiB header is held (and re-copied) in
  memory. Bytes received while a request's headers are incomplete are counted as they
  arrive: past the limit the request gets ``431 headers-too-large`` and the connection is
  closed, so at most the limit plus one read (256 KiB) is ever buffered. Complete headers
  are measured too (a whole request can arrive in one read).
- **Header-read timeout.** A request's headers must be complete ``header_read_timeout``
  seconds after its first byte arrived (the first request's, after the connection
  opened): a client that trickles a header a byte at a time (slowloris), or connects and
  sends nothing, gets ``408 request-timeout`` and is closed.
- **Idle connections.** A keep-alive connection is closed ``keep_alive_timeout`` seconds
  after its last response if no new request begins.
- **problem+json.** The protocol's own refusals (these two, and ``400 bad-request`` for what
  is not HTTP/1.1) are ``application/problem+json`` with their codes, like every other error
  of the service, where uvicorn would answer ``text/plain``. After a refusal the connection
  reads and discards what the client still sends for a moment (at most
  :data:`LINGER_BYTES`, :data:`LINGER_SECONDS`) so that the client can read the answer
  instead of a reset.
- **No upgrades.** WebSocket or other ``Upgrade`` requests are served as plain requests;
  no route takes a WebSocket.

``trustfleet serve`` uses it. With uvicorn's own command line, name it:
``uvicorn --factory trustfleet.server.runner:app_from_env --http
trustfleet.server.protocol:HttpProtocol`` (the limits then come from the same
``TRUSTFLEET_*`` settings as the app's).
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from trustfleet.server.problems import PROBLEM_MEDIA_TYPE, problem_body, render_problem
from trustfleet.settings import Settings, load_settings

log = logging.getLogger("trustfleet.server.http")

#: after a refusal, what the client still sends is read and dropped, up to this much ...
LINGER_BYTES = 4 * 1_048_576
#: ... for at most this long, before the connection is closed
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_read_timeout: float
    keep_alive_timeout: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_read_timeout=settings.header_read_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
        )


@functools.cache
def _limits_from_environment() -> HttpLimits:
    return HttpLimits.from_settings(load_settings())


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: str
    title: str
    detail: str


def _headers_too_large(limit: int) -> _Refusal:
    return _Refusal(
        431,
        "headers-too-large",
        "The request headers are too large",
        f"The request line and headers exceed the limit of {limit} bytes",
    )


_NOT_HTTP = _Refusal(
    400, "bad-request", "The request could not be understood", "The request is not valid HTTP/1.1"
)


class _Refused(Exception):
    """Raised from a parser callback to stop the parser (it re-raises it wrapped)."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with trustfleet's limits (the module says which).
    ``limits`` is set on a subclass by :func:`protocol_for`; on this class it is read from
    the ``TRUSTFLEET_*`` settings on first use."""

    limits: ClassVar[HttpLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = type(self).limits or _limits_from_environment()
        self.max_header_bytes = limits.max_header_bytes
        self.header_read_timeout = limits.header_read_timeout
        self.timeout_keep_alive = limits.keep_alive_timeout
        self.ws_protocol_class = None  # no route takes a WebSocket: upgrades are not served
        #: the next bytes belong to a request line or headers (counted against the limit)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: _Refusal | None = None
        self._discarding = False
        self._discarded = 0

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._awaiting_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # served as a plain request (on_headers_complete); nothing is upgraded
        except httptools.HttpParserError:
            self._refuse(self._refusal or _NOT_HTTP)
            return
        if self._awaiting_headers:
            if self._header_bytes > self.max_header_bytes:
                self._refuse(_headers_too_large(self.max_header_bytes))
            elif self._header_bytes and self._header_timer is None:
                # a request began on a kept-alive connection and its headers are not all
                # here (most arrive whole in one read: no timer for them). One begun in the
                # read that ended the one before is left to the keep-alive timeout.
                self._arm_header_timer()

    # -- parser callbacks ------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        # measured when the bytes seen could hold too much, or were not counted (the
        # request began in the read that ended the one before it)
        if self._header_bytes > self.max_header_bytes or not self._header_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.max_header_bytes:
                self._refusal = _headers_too_large(self.max_header_bytes)
                raise _Refused()
        HttpToolsProtocol.on_headers_complete(self)  # not super(): a hot path

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._awaiting_headers = True
        self._header_bytes = 0

    # -- refusals --------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._refuse(_NOT_HTTP)

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer ``refusal`` as problem+json and close the connection (after lingering)."""
        self._cancel_header_timer()
        if self.transport.is_closing():
            return
        log.debug("refused a connection's request: %s [%s]", refusal.detail, refusal.code)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is being written: no room for another
            return
        body = render_problem(
            problem_body(
                status=refusal.status,
                code=refusal.code,
                title=refusal.title,
                detail=refusal.detail,
            )
        )
        phrase = http.HTTPStatus(refusal.status).phrase.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (refusal.status, phrase)]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _linger(self) -> None:
        """Read and drop what the client still sends, briefly, then close: closing with
        unread bytes would reset the connection and lose the answer. Over TLS there is no
        half-close; the client sees the answer's ``Connection: close`` and length."""
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    # -- the header-read timer -------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_read_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a pipelined request waits for the response before it
            return
        self._refuse(
            _Refusal(
                408,
                "request-timeout",
                "The request headers did not arrive in time",
                f"The request line and headers must arrive within "
                f"{self.header_read_timeout:g} seconds",
            )
        )


def protocol_for(settings: Settings) -> type[HttpProtocol]:
    """:class:`HttpProtocol` with the limits of ``settings``."""
    limits = HttpLimits.from_settings(settings)
    return type("HttpProtocol", (HttpProtocol,), {"limits": limits})
