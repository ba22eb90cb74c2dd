"""Prometheus metrics, one registry per app (so tests and several apps never share counters).

Exposed at ``GET /metrics`` without authentication: the series carry only route templates
(``/v1/tokens/{token_id}``, never the filled-in path), methods, status codes and audit
action names, no identifiers or secrets. Counters are per process; Prometheus sums them
across nodes.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from trustfleet.store import Database
from trustfleet.store.audit import PENDING_INFO_KEY

UNMATCHED_ROUTE = "unmatched"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The app's collectors; ``render()`` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("method", "route", "status")
        self.requests = Counter(
            "trustfleet_http_requests",
            "HTTP requests answered, by route template and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "trustfleet_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and status",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_records = Counter(
            "trustfleet_audit_records_written",
            "Audit records committed by this process, by action and outcome",
            ("action", "outcome"),
            registry=self.registry,
        )
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in _KNOWN_METHODS else "OTHER", route, status)
        series = self._series.get(key)
        if series is None:  # label lookups cost more than the update: done once per series
            labels = (key[0], route, str(status))
            series = self._series[key] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        series[0].inc()
        series[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_audit(self, db: Database) -> None:
        """Count the audit records of each unit of work on ``db`` once it commits."""
        db.on_commit(self._count_pending)

    def _count_pending(self, info: dict[str, Any]) -> None:
        for action, outcome in info.pop(PENDING_INFO_KEY, []):
            self.audit_records.labels(action, outcome).inc()


def route_template(scope: MutableMapping[str, Any]) -> str:
    """The matched route's path template, or ``unmatched`` (never the raw path: unbounded
    label values would let any client grow the registry without limit)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE
