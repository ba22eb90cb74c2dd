"""The host's HTTP reporter: reporting never decides a power-up; what cannot be delivered
waits in order (in a file, across processes) and goes out once the server answers; against
real server processes, and through ``trustfleet se`` as a device and an operator run it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import Node, admin_token_for, node_environment, start_node, stop, wait_ready
from trustfleet.binding.errors import SeBoundElsewhere, SeTokenMissing
from trustfleet.binding.host import BindingEvent
from trustfleet.binding.reporting import REPORT_PATH, TOKEN_ENV, BindingReport, HttpReporter

from .conftest import HostFactory, make_se

# =====================================================================================
# Against a stand-in server (httpx's mock transport)
# =====================================================================================


@dataclass
class StandIn:
    """A fleet view that can be down, or answer with a chosen status."""

    down: bool = False
    status: int = 200
    attempts: int = 0
    accepted: list[BindingReport] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        assert request.url.path == REPORT_PATH
        assert request.headers["authorization"] == "Bearer tf_gateway"
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.status != 200:
            return httpx.Response(self.status, json={"code": f"code-{self.status}"})
        report = BindingReport.from_json(request.content)
        self.accepted.append(report)
        return httpx.Response(200, json={"status": "recorded", "report_id": report.report_id})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> StandIn:
    return StandIn()


@pytest.fixture
def client(server: StandIn) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.MockTransport(server.handle), base_url="http://fleet") as c:
        yield c


def test_an_unreachable_server_never_breaks_a_power_up_and_the_queue_goes_out_in_order(
    make_host: HostFactory, server: StandIn, client: httpx.Client, tmp_path: Path
) -> None:
    clock, queue = Clock(), tmp_path / "reports.queue"
    reporter = HttpReporter(client, "tf_gateway", queue_file=queue, monotonic=clock)
    host = make_host(make_se(), device_id="gw", reporter=reporter)
    server.down = True
    assert host.power_up().bound_now  # bound, verified, locked
    host.power_up()
    host.power_up()
    assert reporter.pending == 5
    assert server.attempts == 1  # after a failure the reporter backs off: no timeout per event
    assert len(queue.read_bytes().splitlines()) == 5

    server.down = False
    host.power_up()  # still in the back-off: queued
    assert (reporter.pending, server.attempts) == (6, 1)
    clock.now += 31
    host.power_up()
    assert reporter.pending == 0 and not queue.exists()
    kinds = [report.kind.value for report in server.accepted]
    assert kinds == ["bound", "verified", "locked", "verified", "verified", "verified", "verified"]
    assert len({report.report_id for report in server.accepted}) == 7
    assert {report.device_id for report in server.accepted} == {"gw"}


def test_a_queue_file_outlives_the_process_and_a_corrupt_line_is_dropped(
    make_host: HostFactory, server: StandIn, client: httpx.Client, tmp_path: Path
) -> None:
    queue = tmp_path / "reports.queue"
    server.down = True
    first = HttpReporter(client, "tf_gateway", queue_file=queue)
    make_host(make_se(), device_id="gw", reporter=first).power_up()
    first.close()
    queue.write_bytes(queue.read_bytes() + b'{"type":"se-binding-report","v":1}\n')
    server.down = False
    later = HttpReporter(client, "tf_gateway", queue_file=queue)
    assert later.pending == 3
    assert later.flush() == 0
    assert [r.kind.value for r in server.accepted] == ["bound", "verified", "locked"]


@pytest.mark.parametrize(("status", "kept"), [(400, 0), (409, 0), (422, 0), (401, 3), (503, 3)])
def test_a_report_the_server_refuses_for_what_it_says_is_dropped_others_wait(
    make_host: HostFactory,
    server: StandIn,
    client: httpx.Client,
    status: int,
    kept: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.status = status
    reporter = HttpReporter(client, "tf_gateway")
    with caplog.at_level(logging.WARNING, logger="trustfleet.binding.reporting"):
        assert make_host(make_se(), device_id="gw", reporter=reporter).power_up().bound_now
    assert reporter.pending == kept
    assert f"{status} [code-{status}]" in caplog.text
    assert ("dropped" in caplog.text) is (kept == 0)


def test_a_full_queue_drops_its_oldest_report_and_says_so(
    make_host: HostFactory, server: StandIn, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    server.down = True
    clock = Clock()
    reporter = HttpReporter(client, "tf_gateway", max_queued=2, monotonic=clock)
    with caplog.at_level(logging.WARNING, logger="trustfleet.binding.reporting"):
        make_host(make_se(), device_id="gw", reporter=reporter).power_up()
    assert reporter.pending == 2
    assert "dropped the oldest unsent event" in caplog.text
    server.down = False
    assert reporter.flush() == 0
    assert [r.kind.value for r in server.accepted] == ["verified", "locked"]


def test_a_reporter_that_raises_does_not_decide_the_power_up(
    make_host: HostFactory, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[BindingEvent] = []

    def broken(event: BindingEvent) -> None:
        calls.append(event)
        raise RuntimeError("reporter bug")

    se = make_se()
    with caplog.at_level(logging.ERROR, logger="trustfleet.binding"):
        host = make_host(se, device_id="gw", reporter=broken)
        assert host.power_up().bound_now
        assert host.holder_data() == b"subscriber 42"
    assert [e.kind.value for e in calls] == ["bound", "verified", "locked"]
    assert "event bound not reported" in caplog.text
    with pytest.raises(SeBoundElsewhere):  # the SE still decides
        make_host(se, device_id="thief", reporter=broken).power_up()


def test_the_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SeTokenMissing):
        HttpReporter.to_server("http://127.0.0.1:1")
    monkeypatch.setenv(TOKEN_ENV, "tf_gateway")
    HttpReporter.to_server("http://127.0.0.1:1").close()


# =====================================================================================
# Against real server processes
# =====================================================================================


@dataclass
class Server:
    node: Node
    env: dict[str, str]
    admin: str

    @property
    def url(self) -> str:
        return self.node.url


@pytest.fixture
def database_file(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def node(database_file: str, tmp_path: Path) -> Iterator[Server]:
    env = node_environment(database_file, tmp_path)
    admin = admin_token_for(database_file)
    started = start_node("a", env, tmp_path / "node-a")
    try:
        wait_ready(started)
        yield Server(started, env, admin)
    finally:
        stop(started)


def _token(url: str, admin: str, role: str) -> str:
    created = httpx.post(
        url + "/v1/tokens",
        json={"name": f"test {role}", "role": role},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


def _operator_get(url: str, token: str, path: str, **params: Any) -> Any:
    answer = httpx.get(
        url + path, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.slow
def test_the_http_reporter_against_a_real_server_that_goes_away_and_comes_back(
    node: Server,
    make_host: HostFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = _token(node.url, node.admin, "device-gateway")
    operator = _token(node.url, node.admin, "operator")
    monkeypatch.setenv(TOKEN_ENV, gateway)
    queue = tmp_path / "gateway-1.queue"
    reporter = HttpReporter.to_server(node.url, queue_file=queue)
    se = make_se()
    se_id = se.se_id.hex()
    owner = make_host(se, device_id="gateway-1", reporter=reporter)
    for _ in range(3):
        owner.power_up()
    thief = make_host(se, device_id="gateway-2", reporter=HttpReporter.to_server(node.url))
    with pytest.raises(SeBoundElsewhere):
        thief.power_up()
    (flag,) = _operator_get(node.url, operator, "/v1/se/flags")["flags"]
    assert (flag["rule"], flag["device_id"], flag["bound_device"]) == (
        "foreign-failure",
        "gateway-2",
        "gateway-1",
    )

    # the server goes away: the owner's power-ups go on, their events wait in the file
    stop(node.node)
    owner.power_up()
    owner.power_up()
    reporter.close()
    assert reporter.pending == 2 and queue.exists()

    # another node on the same database; the owner's next process delivers, in order
    other = start_node("b", node.env, tmp_path / "node-b")
    try:
        wait_ready(other)
        later = HttpReporter.to_server(other.url, queue_file=queue)
        owner_again = make_host(se, device_id="gateway-1", reporter=later)
        owner_again.power_up()
        assert later.pending == 0 and not queue.exists()
        events = _operator_get(other.url, operator, f"/v1/se/elements/{se_id}/events")["events"]
        kinds = [e["kind"] for e in reversed(events)]
        assert (
            kinds
            == ["bound", "verified", "locked", "verified", "verified", "failed"] + ["verified"] * 3
        )
        assert len({e["report_id"] for e in events}) == len(events)
        assert _operator_get(other.url, operator, "/v1/se/flags", status="all")["flags"] == [flag]
    finally:
        stop(other)


# =====================================================================================
# ``trustfleet se``: a device reports, an operator reads
# =====================================================================================


def se_cli(
    data_dir: Path, *args: str, token: str | None, server: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTFLEET_DATA_DIR": str(data_dir), "COLUMNS": "250"}
    env.pop(TOKEN_ENV, None)
    env.pop("TRUSTFLEET_ADDR", None)
    if token is not None:
        env[TOKEN_ENV] = token
    if server is not None:
        env["TRUSTFLEET_ADDR"] = server
    return subprocess.run(
        [sys.executable, "-m", "trustfleet.cli", "se", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], exit_status: int = 1) -> str:
    assert result.returncode == exit_status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


@pytest.mark.slow
def test_se_verbs_report_to_the_fleet_view_and_operators_read_it(
    node: Server, tmp_path: Path
) -> None:
    gateway = _token(node.url, node.admin, "device-gateway")
    operator = _token(node.url, node.admin, "operator")
    data, nv = tmp_path / "cli-data", str(tmp_path / "se.nv")
    issuer = str(tmp_path / "issuer.key")
    ok(se_cli(data, "manufacture", "--nv", nv, "--issuer-key", issuer, token=None))
    gw1 = ["--nv", nv, "--host-dir", str(tmp_path / "gw1")]
    gw2 = ["--nv", nv, "--host-dir", str(tmp_path / "gw2")]
    bound = se_cli(data, "bind", *gw1, "--device-id", "gw-1", "--server", node.url, token=gateway)
    assert "bound and locked" in ok(bound)
    assert "verified" in ok(se_cli(data, "verify", *gw1, token=gateway, server=node.url))
    stolen = se_cli(data, "bind", *gw2, "--device-id", "gw-2", token=gateway, server=node.url)
    assert one_line_error(stolen).startswith("error [se-bound-elsewhere]")

    def as_operator(*args: str) -> subprocess.CompletedProcess[str]:
        return se_cli(data, *args, token=operator, server=node.url)

    listed = json.loads(ok(as_operator("flags", "--output", "json")))
    (flag,) = listed["flags"]
    assert (flag["rule"], flag["device_id"], flag["bound_device"]) == (
        "foreign-failure",
        "gw-2",
        "gw-1",
    )
    table = ok(se_cli(data, "fleet", "--flagged", "--server", node.url, token=operator))
    assert flag["se_id"] in table and "gw-1" in table
    events = json.loads(ok(as_operator("events", flag["se_id"], "--output", "json")))
    kinds = ["failed", "verified", "locked", "verified", "bound"]
    assert [e["kind"] for e in events["events"]] == kinds
    acked = as_operator("ack", str(flag["id"]), "--note", "checked")
    assert f"flag {flag['id']} (foreign-failure" in ok(acked)
    again = as_operator("ack", str(flag["id"]))
    assert one_line_error(again).startswith(
        f"error [se-flag-already-acknowledged]: flag {flag['id']} was acknowledged already"
    )
    forbidden = se_cli(data, "flags", token=gateway, server=node.url)
    assert one_line_error(forbidden).startswith("error [forbidden]")
    missing = se_cli(data, "fleet", token=None, server=node.url)
    assert one_line_error(missing, 2).startswith("error [no-token]")  # usage
    down = se_cli(data, "flags", token=operator, server="http://127.0.0.1:1")
    assert one_line_error(down, 3).startswith("error [server-unreachable]")

    # a device whose server is unreachable still verifies; its event waits in its host dir
    offline = se_cli(data, "verify", *gw1, token=gateway, server="http://127.0.0.1:1")
    assert "verified" in ok(offline)
    assert "queued in" in offline.stderr
    assert len((tmp_path / "gw1" / "reports.queue").read_bytes().splitlines()) == 1
    ok(se_cli(data, "verify", *gw1, token=gateway, server=node.url))
    assert not (tmp_path / "gw1" / "reports.queue").exists()
