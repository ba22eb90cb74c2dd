"""A host's binding events on their way to the server's fleet view: the report message and
the HTTP reporter.

Each event of a power-up (bound, locked, verified, failed, blocked) becomes one
``se-binding-report`` (canonical JSON, :mod:`trustfleet.wire`)::

    {"type": "se-binding-report", "v": 1, "report_id": "<32 hex>", "kind": "failed",
     "device_id": "gateway-2", "se_id": "<32 hex>", "time": "2026-12-06T10:00:00Z"}

posted to ``POST /v1/se/reports`` with a ``device-gateway`` token. ``report_id`` is random,
made once per event: a report sent again after a lost answer is recorded once. ``time`` is
the host's clock (whole seconds); the server judges reports in the order it receives them.

:class:`HttpReporter` never lets reporting decide a power-up. A report that cannot be
delivered (server unreachable, timeout, 5xx, 429, or a 401/403 that a new token would
fix) stays queued, oldest first, and goes out before the next event; after a failure the
reporter does not try again for ``backoff_seconds``, so a host that boots with the network
down pays no timeout per event. With ``queue_file`` the queue survives the process (a
host that verifies its SE before its network is up reports at a later power-up);
without it, what is unsent when the process ends is lost (logged). A queue over
``max_queued`` drops its oldest event (logged). A report the server refuses for what it
says (400, 409, 413, 422) can never be accepted and is dropped (logged).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx

from trustfleet.binding.errors import SeMalformedMessage, SeTokenMissing
from trustfleet.binding.host import BindingEvent, EventKind
from trustfleet.binding.protocol import MAX_DEVICE_ID_SIZE, SE_ID_SIZE
from trustfleet.store.files import atomic_write, read_small_file, remove_stale_temporaries
from trustfleet.wire import Alphabet, Codec, Fields, Message, as_utc, format_time

REPORT_PATH = "/v1/se/reports"
TOKEN_ENV = "TRUSTFLEET_TOKEN"  # noqa: S105 (the variable's name, not a token)
REPORT_ID_BYTES = 16
#: 32 lowercase hex digits (an SE ID, a report id)
HEX_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
HEX_ID_RULE = "32 lowercase hex digits"
REPORT_CODEC = Codec(malformed=SeMalformedMessage, alphabet=Alphabet.URL, version=1, max_size=1024)
_KINDS = frozenset(kind.value for kind in EventKind)
_MAX_QUEUE_FILE = 4 * 1024 * 1024

log = logging.getLogger("trustfleet.binding.reporting")


def valid_device_id(device_id: object) -> bool:
    """1..64 UTF-8 bytes (the host's own limit), printable."""
    return (
        isinstance(device_id, str)
        and 1 <= len(device_id.encode("utf-8", "surrogatepass")) <= MAX_DEVICE_ID_SIZE
        and device_id.isprintable()
    )


@dataclass(frozen=True, slots=True)
class BindingReport(Message):
    """One binding event of a host, as the fleet view receives it."""

    TYPE: ClassVar[str] = "se-binding-report"
    CODEC: ClassVar[Codec] = REPORT_CODEC
    report_id: str
    kind: EventKind
    device_id: str
    se_id: str
    time: datetime

    def __post_init__(self) -> None:
        REPORT_CODEC.check_text(self.report_id, "report_id", HEX_ID_PATTERN, HEX_ID_RULE)
        REPORT_CODEC.check_text(self.se_id, "se_id", HEX_ID_PATTERN, HEX_ID_RULE)
        if not isinstance(self.kind, EventKind):
            REPORT_CODEC.fail("kind must be an EventKind")
        if not valid_device_id(self.device_id):
            REPORT_CODEC.fail(f"device_id must be 1..{MAX_DEVICE_ID_SIZE} printable UTF-8 bytes")
        REPORT_CODEC.check_time(self.time, "time")

    @classmethod
    def of(cls, event: BindingEvent, report_id: str) -> BindingReport:
        if len(event.se_id) != SE_ID_SIZE:
            REPORT_CODEC.fail(f"an SE ID is {SE_ID_SIZE} bytes")
        return cls(
            report_id=report_id,
            kind=event.kind,
            device_id=event.device_id,
            se_id=event.se_id.hex(),
            time=as_utc(event.time).replace(microsecond=0),
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "report_id": self.report_id,
            "kind": self.kind.value,
            "device_id": self.device_id,
            "se_id": self.se_id,
            "time": format_time(self.time),
        }

    @classmethod
    def _from_fields(cls, fields: Fields) -> Self:
        return cls(
            report_id=fields.text("report_id"),
            kind=EventKind(fields.choice("kind", _KINDS)),
            device_id=fields.text("device_id"),
            se_id=fields.text("se_id"),
            time=fields.time("time"),
        )


class _Outcome(Enum):
    SENT = "sent"
    RETRY = "retry"  # keep it queued: the server or the link may take it later
    DROP = "drop"  # the server refused what it says: sending it again cannot help


#: statuses after which the same report may be accepted later (a new token, a server back)
_RETRY_STATUSES = frozenset({401, 403, 408, 425, 429})


class HttpReporter:
    """A :data:`~trustfleet.binding.host.Reporter` that posts each event to the fleet view
    (see the module docstring for what happens when it cannot). ``client`` is any
    ``httpx.Client`` whose base URL is the server (FastAPI's TestClient is one)."""

    def __init__(
        self,
        client: httpx.Client,
        token: str,
        *,
        queue_file: Path | None = None,
        max_queued: int = 1000,
        backoff_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        random: Callable[[int], bytes] = os.urandom,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._queue_file = queue_file
        self._max_queued = max_queued
        self._backoff = backoff_seconds
        self._monotonic = monotonic
        self._random = random
        self._owns_client = owns_client
        self._lock = threading.Lock()
        self._retry_at: float | None = None
        self._pending: deque[bytes] = deque(self._load())
        self._on_file = list(self._pending)

    @classmethod
    def to_server(
        cls, server: str, *, timeout: float = 2.0, queue_file: Path | None = None
    ) -> HttpReporter:
        """A reporter to ``server`` (base URL) with the device-gateway token of the
        ``TRUSTFLEET_TOKEN`` environment variable (never a command-line argument)."""
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            raise SeTokenMissing(f"set {TOKEN_ENV} to a device-gateway token to report events")
        client = httpx.Client(base_url=server, timeout=timeout)
        return cls(client, token, queue_file=queue_file, owns_client=True)

    @property
    def pending(self) -> int:
        """Reports not delivered yet."""
        return len(self._pending)

    def __call__(self, event: BindingEvent) -> None:
        try:
            report = BindingReport.of(event, self._random(REPORT_ID_BYTES).hex())
            with self._lock:
                self._pending.append(report.to_json())
                if len(self._pending) > self._max_queued:
                    self._pending.popleft()
                    log.warning("binding report queue full: dropped the oldest unsent event")
                self._flush(force=False)
        except Exception:  # reporting must never break a power-up
            log.exception("could not report a binding event")

    def flush(self) -> int:
        """Send what is queued now, oldest first, even during the back-off; the number of
        reports still queued."""
        with self._lock:
            self._flush(force=True)
            return len(self._pending)

    def close(self) -> None:
        """Say what stays unsent, and close the client if this reporter made it."""
        if self._pending:
            where = f"kept in {self._queue_file}" if self._queue_file else "lost"
            log.warning("%d binding event(s) not reported: %s", len(self._pending), where)
        if self._owns_client:
            self._client.close()

    # -- sending -------------------------------------------------------------------------

    def _flush(self, *, force: bool) -> None:
        if not force and self._retry_at is not None and self._monotonic() < self._retry_at:
            self._save()
            return
        while self._pending:
            outcome = self._send(self._pending[0])
            if outcome is _Outcome.RETRY:
                self._retry_at = self._monotonic() + self._backoff
                break
            self._pending.popleft()
            self._retry_at = None
        self._save()

    def _send(self, body: bytes) -> _Outcome:
        try:
            response = self._client.post(REPORT_PATH, content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            log.warning(
                "binding event not reported (%s); %d queued, next try in %gs",
                type(exc).__name__,
                len(self._pending),
                self._backoff,
            )
            return _Outcome.RETRY
        status = response.status_code
        if status < 300:
            return _Outcome.SENT
        code = _problem_code(response)
        if status >= 500 or status in _RETRY_STATUSES:
            log.warning(
                "binding event not reported: the server answered %d [%s]; %d queued",
                status,
                code,
                len(self._pending),
            )
            return _Outcome.RETRY
        log.error("binding event refused by the server: %d [%s]; dropped", status, code)
        return _Outcome.DROP

    # -- the queue file ------------------------------------------------------------------

    def _load(self) -> list[bytes]:
        path = self._queue_file
        if path is None or not path.exists():
            return []
        remove_stale_temporaries(path)
        try:
            lines = read_small_file(path, _MAX_QUEUE_FILE).splitlines()
        except (OSError, ValueError):
            log.error("the binding report queue %s cannot be read; starting empty", path)
            return []
        kept = []
        for line in lines:
            try:
                kept.append(BindingReport.from_json(line).to_json())
            except SeMalformedMessage:
                log.error("a malformed line of the binding report queue was dropped")
        return kept[-self._max_queued :]

    def _save(self) -> None:
        path = self._queue_file
        if path is None or list(self._pending) == self._on_file:
            return
        try:
            if self._pending:
                atomic_write(path, b"".join(report + b"\n" for report in self._pending))
            else:
                path.unlink(missing_ok=True)
        except OSError:
            log.exception("could not write the binding report queue %s", path)
            return
        self._on_file = list(self._pending)


def _problem_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["code"])[:64]
    except (ValueError, KeyError, TypeError):
        return f"http-{response.status_code}"
