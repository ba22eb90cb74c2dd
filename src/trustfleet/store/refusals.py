"""Refused requests are audited at a bounded rate: a flood of bad tokens or forged webhook
signatures costs the audit log a few records, not one per request.

Time is cut into windows of ``window_seconds``. In each window the first refusal of an
action from a client (an IPv4 address, or an IPv6 /64 network) is written at once as its own
record, for at most ``clients`` clients; every further refusal of that action from that
client in the window is only counted in memory. When the window has closed, each count is
written as one aggregate record: the same action, ``details.aggregate = true``,
``details.count`` (how many refusals it stands for), ``details.kinds`` (the count per
reason) and ``details.subjects`` (per route, the first few). Refusals from clients beyond the
``clients`` budget are all counted into one aggregate record per action with client ``"*"``.
So one window writes at most ``2 * clients`` records per action plus one, however many
requests arrive, and memory holds at most ``clients`` entries per action.

The aggregates of a closed window are written by the first refusal after it, by a timer at
the window's end, or by :meth:`RefusalAudit.close` (the server's shutdown). Counts are per
process: each node of a deployment keeps its own.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trustfleet.store.work import Database

log = logging.getLogger("trustfleet.audit")

#: how many distinct subjects an aggregate record names
MAX_SUBJECTS = 10
#: how many distinct kinds (reasons) an aggregate record names; the rest count as "other"
MAX_KINDS = 20
OVERFLOW_CLIENT = "*"


@dataclass(frozen=True)
class Refusal:
    """One audit record to write."""

    action: str
    actor: str
    subject: str
    details: Mapping[str, Any]


@dataclass
class _Count:
    actor: str
    count: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    subjects: dict[str, int] = field(default_factory=dict)

    def add(self, actor: str, subject: str, kind: str) -> None:
        self.actor = actor
        self.count += 1
        if kind in self.kinds or len(self.kinds) < MAX_KINDS:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        else:
            self.kinds["other"] = self.kinds.get("other", 0) + 1
        if subject in self.subjects or len(self.subjects) < MAX_SUBJECTS:
            self.subjects[subject] = self.subjects.get(subject, 0) + 1


def client_key(client: str) -> str:
    """The client a refusal is counted against: the IPv4 address, the IPv6 /64 network (one
    host has a whole /64 to pick addresses from), or the text as given, clipped."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client[:64]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class RefusalAudit:
    """Audits refusals at a bounded rate (the module says how). Thread-safe: refusals come
    from the event loop and from the thread pool."""

    def __init__(
        self,
        db: Database,
        *,
        window_seconds: float = 60.0,
        clients: int = 100,
        clock: Callable[[], float] = time.monotonic,
        timer: bool = True,
    ) -> None:
        if window_seconds <= 0 or clients < 1:
            raise ValueError("window_seconds must be positive and clients at least 1")
        self._db = db
        self._window = window_seconds
        self._clients = clients
        self._clock = clock
        self._timer_enabled = timer
        self._lock = threading.Lock()
        self._epoch = self._epoch_of(clock())
        #: (action, client) -> refusals counted (not written) in the current window
        self._counts: dict[tuple[str, str], _Count] = {}
        #: (action, client) of the clients whose first refusal of the window was written
        self._seen: set[tuple[str, str]] = set()
        self._seen_per_action: dict[str, int] = {}
        self._timer: threading.Timer | None = None
        self._closed = False

    @property
    def window_seconds(self) -> float:
        return self._window

    def _epoch_of(self, now: float) -> int:
        return int(now // self._window)

    def note(
        self,
        action: str,
        *,
        actor: str,
        subject: str,
        client: str,
        kind: str,
        details: Mapping[str, Any],
    ) -> list[Refusal]:
        """Count one refusal; returns the records to write now (this refusal's own record
        when it is the client's first of the window, and the aggregates of a window that
        has closed), usually none. Does no I/O: :meth:`write` writes them."""
        key_client = client_key(client)
        with self._lock:
            due = self._rotate(self._clock())
            key = (action, key_client)
            if key not in self._seen and key not in self._counts:
                if self._seen_per_action.get(action, 0) < self._clients:
                    self._seen.add(key)
                    self._seen_per_action[action] = self._seen_per_action.get(action, 0) + 1
                    due.append(Refusal(action, actor, subject, {**details, "client": client}))
                    return due
                key = (action, OVERFLOW_CLIENT)
            count = self._counts.get(key)
            if count is None:
                count = self._counts[key] = _Count(actor)
            count.add(actor, subject, kind)
            self._arm_timer()
        return due

    def refused(
        self,
        action: str,
        *,
        actor: str,
        subject: str,
        client: str,
        kind: str,
        details: Mapping[str, Any],
    ) -> None:
        """:meth:`note` then :meth:`write`: for callers already off the event loop."""
        due = self.note(
            action, actor=actor, subject=subject, client=client, kind=kind, details=details
        )
        if due:
            self.write(due)

    def write(self, records: list[Refusal]) -> None:
        """Write ``records`` in one unit of work; a failure is logged, never raised: the
        request is refused either way, and a failed write must not turn 401 into 500."""
        if not records:
            return
        try:
            with self._db.work() as work:
                for record in records:
                    work.audit(
                        record.action,
                        actor=record.actor,
                        subject=record.subject,
                        outcome="failure",
                        details=record.details,
                    )
        except Exception:
            log.exception("could not write %d refusal audit record(s)", len(records))

    def flush(self) -> None:
        """Write the aggregates of a window that has closed (the timer calls this)."""
        with self._lock:
            due = self._rotate(self._clock())
        self.write(due)

    def close(self) -> None:
        """Write every count kept so far, whether or not its window has closed."""
        with self._lock:
            self._closed = True
            due = self._aggregates()
            self._reset()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self.write(due)

    # -- under the lock ------------------------------------------------------------------

    def _rotate(self, now: float) -> list[Refusal]:
        epoch = self._epoch_of(now)
        if epoch == self._epoch:
            return []
        due = self._aggregates()
        self._epoch = epoch
        self._reset()
        return due

    def _reset(self) -> None:
        self._counts = {}
        self._seen = set()
        self._seen_per_action = {}

    def _aggregates(self) -> list[Refusal]:
        return [
            Refusal(
                action,
                count.actor,
                "",
                {
                    "aggregate": True,
                    "client": client,
                    "count": count.count,
                    "kinds": dict(count.kinds),
                    "subjects": dict(count.subjects),
                    "window_seconds": self._window,
                },
            )
            for (action, client), count in self._counts.items()
        ]

    def _arm_timer(self) -> None:
        if not self._timer_enabled or self._timer is not None or self._closed:
            return
        delay = (self._epoch + 1) * self._window - self._clock() + 0.05
        timer = threading.Timer(max(delay, 0.05), self._on_timer)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            due = self._rotate(self._clock())
            if self._counts:  # woke early: try again at the window's end
                self._arm_timer()
        self.write(due)
