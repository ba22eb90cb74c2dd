"""Fixtures for SE binding: SEs in memory or on file, hosts with their own stores, and a
transport that records (and can tamper with) every APDU on the bus."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from trustfleet.binding.fleet import Fleet, ReportReceipt
from trustfleet.binding.host import BindingEvent, EventKind, Host, HostKey, HostStore, Reporter
from trustfleet.binding.protocol import Mode
from trustfleet.binding.reporting import BindingReport
from trustfleet.binding.secure_element import SecureElement
from trustfleet.binding.storage import MemoryNvStore, NvStore
from trustfleet.binding.transport import InProcessTransport
from trustfleet.store import Database

ISSUER_KEY = bytes(range(32))
SUITES = ["p256", "gm"]
MODES = list(Mode)


class RecordingTransport(InProcessTransport):
    """The bus between host and SE: every exchange is kept; ``tamper`` may rewrite them."""

    def __init__(self, se: SecureElement) -> None:
        super().__init__(se)
        self.exchanges: list[tuple[bytes, bytes]] = []
        self.tamper_command: Callable[[bytes], bytes] | None = None
        self.tamper_response: Callable[[bytes], bytes] | None = None

    def transmit(self, command: bytes) -> bytes:
        if self.tamper_command:
            command = self.tamper_command(command)
        response = super().transmit(command)
        if self.tamper_response:
            response = self.tamper_response(response)
        self.exchanges.append((command, response))
        return response

    def bus_bytes(self) -> bytes:
        return b"".join(c + r for c, r in self.exchanges)


def make_se(
    suite: str = "p256", nv: NvStore | None = None, holder_data: bytes = b"subscriber 42"
) -> SecureElement:
    return SecureElement.manufacture(
        nv if nv is not None else MemoryNvStore(),
        issuer_key=ISSUER_KEY,
        issuer_suite=suite,
        holder_data=holder_data,
    )


@dataclass
class HostFactory:
    tmp_path: Path
    events: list[BindingEvent] = field(default_factory=list)
    count: int = 0

    def __call__(
        self,
        se: SecureElement,
        *,
        mode: Mode = Mode.MUTUAL,
        suite: str = "p256",
        device_id: str | None = None,
        r1_from_host: bool = False,
        store_path: Path | None = None,
        reporter: Reporter | None = None,
    ) -> Host:
        self.count += 1
        device_id = device_id or f"host-{self.count}"
        path = store_path or self.tmp_path / f"{device_id}.store"
        key_path = path.with_suffix(".key")
        key = HostKey.load_or_create(key_path)
        return Host(
            RecordingTransport(se),
            HostStore(path, key),
            device_id=device_id,
            mode=mode,
            suite=suite,
            r1_from_host=r1_from_host,
            reporter=reporter or self.events.append,
            random=os.urandom,
        )


@pytest.fixture
def make_host(tmp_path: Path) -> HostFactory:
    return HostFactory(tmp_path)


def bus(host: Host) -> RecordingTransport:
    assert isinstance(host.transport, RecordingTransport)
    return host.transport


# -- the fleet view -----------------------------------------------------------------------

GATEWAY_ACTOR = "token:1:test device-gateway"


@dataclass
class ServiceReporter:
    """A host's reporter wired to the fleet use cases without HTTP; keeps every receipt
    and every error (the host itself swallows a reporter's errors, the tests must not)."""

    fleet: Fleet
    receipts: list[ReportReceipt] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def __call__(self, event: BindingEvent) -> None:
        body = BindingReport.of(event, os.urandom(16).hex()).to_json()
        try:
            self.receipts.append(self.fleet.report(body, actor=GATEWAY_ACTOR))
        except Exception as exc:
            self.errors.append(exc)
            raise


@pytest.fixture
def fleet(db: Database) -> Fleet:
    return Fleet(db)


def report_body(
    kind: str, device_id: str, se_id: str, *, report_id: str | None = None, when: str = ""
) -> bytes:
    """An ``se-binding-report`` as a host sends it."""
    return BindingReport(
        report_id=report_id or os.urandom(16).hex(),
        kind=EventKind(kind),
        device_id=device_id,
        se_id=se_id,
        time=datetime.fromisoformat(when or "2026-12-06T10:00:00+00:00"),
    ).to_json()
