"""``trustfleet tmk`` (the key server's side, on the local database) and
``trustfleet emulate pos`` (the reference POS terminal, over HTTP), plus the demo step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_der_x509_crl
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import InvalidInput
from trustfleet.kit.cli import console, state
from trustfleet.tmk import registry, services
from trustfleet.tmk.conformance import SUITES as CONFORMANCE_SUITES
from trustfleet.tmk.conformance import CheckResult, Conformance, Report, load_tokens
from trustfleet.tmk.identity import KeyServerIdentity
from trustfleet.tmk.protocol import PROTOCOL_VERSION, PROTOCOL_VERSIONS
from trustfleet.tmk.terminal import IDENTITY_PATH, HttpTransport, PosTerminal
from trustfleet.tmk.terminals import TerminalOverview
from trustfleet.tmk.working_keys import WORKING_KEY_USAGES

if TYPE_CHECKING:
    from trustfleet.kit.demo import DemoEnv

app = typer.Typer(no_args_is_help=True, help="POS terminals: registry, TMKs, working keys.")
identity_app = typer.Typer(
    no_args_is_help=True, help="The key server's identity: KSRCRT and the work certificate."
)
app.add_typer(identity_app, name="identity")
pos_app = typer.Typer(no_args_is_help=True, help="The reference POS terminal (emulator).")

ACTOR = "cli"
DEFAULT_POS_DIR = Path("pos-terminal")
TKP_ALGORITHMS = {"p256": "ec-p256", "rsa-2048": "rsa-2048", "rsa-3072": "rsa-3072", "sm2": "sm2"}
DEMO_PAN = "4111111111111111"


# =====================================================================================
# trustfleet tmk: registry
# =====================================================================================


def _import_kind(path: Path, given: str | None) -> str:
    kind = given or {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}.get(path.suffix)
    if kind not in ("csv", "ndjson"):
        raise InvalidInput("give --format csv or ndjson (or name the file .csv / .ndjson)")
    return kind


def _count_rows(path: Path, kind: str) -> int:
    with path.open("rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return max(lines - 1, 0) if kind == "csv" else lines


@app.command("import")
def import_terminals(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV or NDJSON.")],
    file_format: Annotated[
        str | None, typer.Option("--format", help="csv or ndjson (default: by extension).")
    ] = None,
    rejections: Annotated[
        Path | None,
        typer.Option(help="Where to write rejected rows (default: FILE.rejections.ndjson)."),
    ] = None,
) -> None:
    """Register terminals in bulk (one transaction). Re-importing a file changes nothing;
    rejected rows are reported with their code and written to the rejections file."""
    kind = _import_kind(file, file_format)
    total = _count_rows(file, kind)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    context = state.context()
    with (
        Progress(*columns, console=console) as progress,
        file.open(encoding="utf-8-sig", newline="") as handle,
    ):
        task = progress.add_task("importing terminals", total=total)
        rows = registry.read_csv(handle) if kind == "csv" else registry.read_ndjson(handle)
        report = registry.import_terminals(
            context.db,
            rows,
            actor=ACTOR,
            progress=lambda n: progress.advance(task, n),
        )
    console.print(
        f"{report.rows} rows: {report.accepted} registered, {report.unchanged} unchanged, "
        f"{len(report.rejected)} rejected"
    )
    if report.rejected:
        out = rejections or file.with_name(file.name + ".rejections.ndjson")
        with out.open("w", encoding="utf-8") as sink:
            for row in report.to_dict()["rejected"]:
                sink.write(json.dumps(row) + "\n")
        codes: dict[str, int] = {}
        for rejected in report.rejected:
            codes[rejected.code] = codes.get(rejected.code, 0) + 1
        table = Table("code", "rows")
        for code, count in sorted(codes.items()):
            table.add_row(code, str(count))
        console.print(table)
        console.print(f"rejected rows written to {escape(str(out))}")


@app.command("register")
def register(
    sn: Annotated[str, typer.Option(help="Hardware serial number.")],
    public_key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="TKP_Pu (PEM).")],
    model: Annotated[str, typer.Option(help="Terminal model.")] = "",
) -> None:
    """Register one terminal."""
    context = state.context()
    registered = registry.register_terminal(
        context.db, sn=sn, model=model, public_key=public_key.read_text(), actor=ACTOR
    )
    view = services.terminals(context).overview(registered)
    console.print(f"terminal {escape(view.sn)} registered ({view.key_algorithm})")


def _print_overview(view: TerminalOverview) -> None:
    table = Table("field", "value", show_header=False)
    table.add_row("sn", escape(view.sn))
    table.add_row("model", escape(view.model))
    table.add_row("status", view.status)
    table.add_row("TKP", view.key_algorithm)
    tmk = view.active_tmk
    table.add_row("TMK", f"{tmk.algorithm}, KCV {tmk.kcv}" if tmk else "none")
    table.add_row(
        "next TMK",
        view.tmk_algorithm + (" (rotation requested)" if view.rotation_requested else ""),
    )
    for key in view.working_keys:
        table.add_row(
            f"working key {key.usage}", f"{key.algorithm} v{key.key_version}, KCV {key.kcv}"
        )
    console.print(table)


@app.command("show")
def show(sn: Annotated[str, typer.Argument(help="Serial number.")]) -> None:
    """A terminal's status, TMK and working keys (KCVs only)."""
    _print_overview(services.terminals(state.context()).overview(sn))


def _status_command(action: str) -> None:
    def command(
        sn: Annotated[str, typer.Argument(help="Serial number.")],
        reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    ) -> None:
        _print_overview(
            services.terminals(state.context()).change_status(
                sn, action, actor=ACTOR, reason=reason
            )
        )

    command.__doc__ = {
        "suspend": "Suspend a terminal: no downloads or working keys until re-activated.",
        "revoke": "Revoke a terminal for good; its TMK and working keys are destroyed.",
        "reactivate": "Re-activate a suspended terminal.",
    }[action]
    app.command(action)(command)


for _action in ("suspend", "revoke", "reactivate"):
    _status_command(_action)


@app.command("rotate-tmk")
def rotate_tmk(
    sn: Annotated[str, typer.Argument(help="Serial number.")],
    algorithm: Annotated[
        str | None, typer.Option(help="aes-128, aes-256 or tdes (default: unchanged).")
    ] = None,
) -> None:
    """Allow the terminal's next download; it retires the current TMK and working keys."""
    chosen = KeyAlgorithm(algorithm) if algorithm else None
    _print_overview(
        services.terminals(state.context()).request_rotation(sn, actor=ACTOR, algorithm=chosen)
    )


@app.command("working-key")
def working_key(
    sn: Annotated[str, typer.Argument(help="Serial number.")],
    usage: Annotated[str, typer.Option(help="P0, M1, M3 or D0.")],
    out: Annotated[Path | None, typer.Option(help="Write the TR-31 block here.")] = None,
) -> None:
    """Issue a working key as a TR-31 block under the terminal's TMK."""
    issued = services.working_keys(state.context()).issue(sn, usage, actor=ACTOR)
    console.print(
        f"{usage} {issued.algorithm.value} v{issued.key_version}, KCV {issued.kcv.hex().upper()}"
    )
    if out:
        out.write_text(issued.key_block + "\n")
        console.print(f"key block -> {escape(str(out))}")
    else:
        console.print(issued.key_block, soft_wrap=True, highlight=False)


@app.command("sweep")
def sweep() -> None:
    """End expired downloads and destroy any key left retired or aborted."""
    report = services.downloads(state.context()).sweep(actor=ACTOR)
    console.print(
        f"{report.sessions_aborted} expired session(s) ended,"
        f" {report.keys_destroyed} key(s) destroyed"
    )


@app.command("conformance")
def conformance(
    server: Annotated[
        str,
        typer.Option(
            help="Where terminals send the download steps: the key server, or the gateway"
            " in front of it."
        ),
    ],
    api: Annotated[
        str | None,
        typer.Option(help="The key server's API, to set up test terminals (default: --server)."),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="JSON file of API tokens by role (device-gateway, manufacturer, operator,"
            " admin). Default: the TRUSTFLEET_TMK_*_TOKEN environment variables.",
        ),
    ] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option(help="p256, rsa-2048, rsa-3072 or sm2 (repeatable; default: all)."),
    ] = None,
    output: Annotated[str, typer.Option(help="text or json.")] = "text",
    wait_for_expiry: Annotated[
        bool, typer.Option(help="Wait out a session's lifetime to check the server expires it.")
    ] = True,
) -> None:
    """Run the scripted downloads, negative cases included, against a key server and print
    a pass/fail report (docs/tmk.md, "Conformance"). Exits 1 if any check fails."""
    if output not in ("text", "json"):
        raise InvalidInput("--output is text or json")
    run = Conformance(
        server,
        load_tokens(tokens),
        api=api,
        suites=tuple(suite) if suite else tuple(CONFORMANCE_SUITES),
        wait_for_expiry=wait_for_expiry,
        progress=_print_check if output == "text" else None,
    )
    report = run.run()
    if output == "json":
        console.print_json(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    if not report.passed:
        raise typer.Exit(1)


_OUTCOME_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def _print_check(result: CheckResult) -> None:
    style = _OUTCOME_STYLE[result.outcome]
    console.print(f"[{style}]{result.outcome:4}[/] {escape(result.name)} ({escape(result.suite)})")


def _print_report(report: Report) -> None:
    table = Table("check", "suite", "expected", "got", "result", title="TMK conformance")
    for result in report.results:
        got = result.got + (f" ({result.detail})" if result.detail else "")
        style = _OUTCOME_STYLE[result.outcome]
        table.add_row(
            escape(result.name),
            escape(result.suite),
            escape(result.expected),
            escape(got),
            f"[{style}]{result.outcome}[/]",
        )
    console.print(table)
    counts = report.counts
    verdict = "[green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    console.print(
        f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        f" against {escape(report.server)}"
    )


# =====================================================================================
# trustfleet tmk identity
# =====================================================================================


def _print_identity(identity: KeyServerIdentity) -> None:
    cert = identity.certificate
    console.print(
        f"work certificate {identity.serial_hex} ({identity.algorithm.value}, {identity.status}),"
        f" valid until {cert.not_valid_after_utc.date().isoformat()}"
    )


@identity_app.command("init")
def identity_init() -> None:
    """Make KSRCRT and a first work certificate (if missing)."""
    _print_identity(services.identity(state.context()).ensure(actor=ACTOR))


@identity_app.command("show")
def identity_show(
    root_out: Annotated[
        Path | None, typer.Option(help="Write KSRCRT (PEM) here, for terminal factories.")
    ] = None,
) -> None:
    """The current work certificate and every earlier one."""
    service = services.identity(state.context())
    for identity in service.history():
        _print_identity(identity)
    if root_out:
        root_out.write_text(service.root().pem)
        console.print(f"KSRCRT -> {escape(str(root_out))}")


@identity_app.command("rotate-work-cert")
def identity_rotate() -> None:
    """New work key and certificate under the same KSRCRT (terminals unchanged)."""
    _print_identity(services.identity(state.context()).rotate(actor=ACTOR))


@identity_app.command("revoke-work-cert")
def identity_revoke(
    reason: Annotated[str, typer.Option(help="RFC 5280 reason.")] = "key_compromise",
) -> None:
    """Revoke the current work certificate (KSRCRT's CRL lists it) and issue a new one."""
    revoked, new = services.identity(state.context()).revoke(actor=ACTOR, reason=reason)
    console.print(f"revoked {revoked.serial_hex} ({reason})")
    _print_identity(new)


@identity_app.command("crl")
def identity_crl(out: Annotated[Path, typer.Option(help="Where to write the CRL (PEM).")]) -> None:
    """KSRCRT's current CRL, for terminals that are loaded offline."""
    der = services.identity(state.context()).crl(actor=ACTOR)
    out.write_bytes(load_der_x509_crl(der).public_bytes(Encoding.PEM))
    console.print(f"KSRCRT CRL -> {escape(str(out))}")


# =====================================================================================
# trustfleet emulate pos
# =====================================================================================

PosDir = Annotated[Path, typer.Option("--dir", help="The terminal's directory.")]
Server = Annotated[str, typer.Option(help="Key server base URL, e.g. http://127.0.0.1:8080")]


@contextmanager
def _client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


@pos_app.command("factory")
def pos_factory(
    sn: Annotated[str, typer.Option(help="Hardware serial number.")],
    out: Annotated[Path, typer.Option(help="The new terminal's directory.")] = DEFAULT_POS_DIR,
    algorithm: Annotated[str, typer.Option(help="p256, rsa-2048, rsa-3072 or sm2.")] = "p256",
    model: Annotated[str, typer.Option(help="Terminal model.")] = "trustfleet-reference-terminal",
    root: Annotated[Path | None, typer.Option(help="KSRCRT (PEM) to preload.")] = None,
    server: Annotated[
        str | None, typer.Option(help="Fetch KSRCRT from this key server instead.")
    ] = None,
) -> None:
    """Make a terminal: TKP generated in its SCM, KSRCRT preloaded, and the record
    (record.ndjson) for `trustfleet tmk import` or POST /v1/tmk/terminals/import."""
    if algorithm not in TKP_ALGORITHMS:
        raise InvalidInput(f"--algorithm is one of {', '.join(TKP_ALGORITHMS)}")
    root_pem = root.read_bytes() if root else None
    if server is not None:
        with _client(server) as client:
            identity = json.loads(HttpTransport(client, "").get(IDENTITY_PATH))
        root_pem = str(identity["ksrcrt_pem"]).encode()
    PosTerminal.factory(
        out, sn, KeyAlgorithm(TKP_ALGORITHMS[algorithm]), model=model, root_pem=root_pem
    )
    console.print(f"terminal {escape(sn)} made in {escape(str(out))}")
    console.print(f"factory record: {escape(str(out / 'record.ndjson'))}")
    if root_pem is None:
        console.print("no KSRCRT preloaded: give --root or --server before downloading")


@pos_app.command("download")
def pos_download(
    server: Server,
    token: Annotated[str, typer.Option(help="The device gateway's API token.")],
    directory: PosDir = DEFAULT_POS_DIR,
    crl: Annotated[bool, typer.Option(help="Fetch and enforce KSRCRT's CRL.")] = True,
    protocol_version: Annotated[
        int,
        typer.Option(
            min=min(PROTOCOL_VERSIONS),
            max=max(PROTOCOL_VERSIONS),
            help="The TMK protocol version to speak (1: as terminals without a signed delivery).",
        ),
    ] = PROTOCOL_VERSION,
) -> None:
    """Download a TMK from the key server (mutual authentication, then key transport)."""
    terminal = PosTerminal.open(directory)
    with _client(server) as client:
        transport = HttpTransport(client, token)
        crls = [terminal.fetch_crl(transport)] if crl else []
        result = terminal.download(transport, crls=crls, version=protocol_version)
    console.print(
        f"TMK {result.algorithm.value} active (KCV {result.kcv.hex().upper()}),"
        f" session {result.session_id}, protocol version {protocol_version}"
    )


@pos_app.command("working-keys")
def pos_working_keys(
    server: Server,
    token: Annotated[str, typer.Option(help="The TMS's (operator) API token.")],
    usage: Annotated[list[str], typer.Option(help="P0, M1, M3 or D0 (repeatable).")],
    directory: PosDir = DEFAULT_POS_DIR,
) -> None:
    """Fetch working keys for this terminal from the TMS API and install them; each block
    must authenticate under the TMK and carry a usage and mode this terminal accepts."""
    terminal = PosTerminal.open(directory)
    with _client(server) as client:
        transport = HttpTransport(client, token)
        for wanted in usage:
            if wanted not in WORKING_KEY_USAGES:
                raise InvalidInput(f"--usage is one of {', '.join(WORKING_KEY_USAGES)}")
            body = json.dumps({"usage": wanted}).encode()
            issued = json.loads(
                transport.post(f"/v1/tmk/terminals/{terminal.sn}/working-keys", body)
            )
            received = terminal.install_working_key(issued["key_block"], wanted)
            console.print(
                f"{wanted} installed: {received.algorithm.value}, mode {received.mode_of_use},"
                f" v{received.key_version}, KCV {received.kcv.hex().upper()}"
            )


@pos_app.command("pin")
def pos_pin(
    pin: Annotated[str, typer.Option(help="The cardholder's PIN (4-12 digits).")],
    pan: Annotated[str, typer.Option(help="The card number.")],
    directory: PosDir = DEFAULT_POS_DIR,
) -> None:
    """Encrypt a PIN block under the terminal's P0 key and print it (hex)."""
    console.print(PosTerminal.open(directory).encrypt_pin(pin, pan).hex().upper())


@pos_app.command("show")
def pos_show(directory: PosDir = DEFAULT_POS_DIR) -> None:
    """SN, TMK and working keys of the terminal (KCVs only)."""
    terminal = PosTerminal.open(directory)
    scm = terminal.scm
    console.print(f"sn {escape(scm.sn)}, TKP {scm.algorithm.value}")
    if scm.has_tmk:
        console.print(f"TMK {scm.tmk_algorithm.value}, KCV {scm.tmk_kcv.hex().upper()}")
    for usage, key in terminal.working_keys().items():
        console.print(f"{usage}: {key.algorithm.value}, KCV {key.kcv.hex().upper()}")


# =====================================================================================
# The demo step
# =====================================================================================


def _request(env: DemoEnv, method: str, path: str, token: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    response = env.client.request(method, path, headers=headers, **kwargs)
    if response.status_code >= 400:
        from trustfleet.kit.demo import DemoFailed

        problem = response.json()
        raise DemoFailed(f"{method} {path}: {problem.get('code')}: {problem.get('detail')}")
    return response.json()


def demo_step(env: DemoEnv) -> None:
    """factory -> import -> download -> working keys -> a PIN block from the terminal,
    deciphered on the server side."""
    console.rule("[bold]tmk: POS terminal master key download and working keys")
    tokens = {
        role: _request(
            env, "POST", "/v1/tokens", env.admin_token, json={"name": f"demo {role}", "role": role}
        )["token"]
        for role in ("manufacturer", "device-gateway", "operator")
    }
    identity = _request(env, "POST", "/v1/tmk/identity", env.admin_token)
    console.print(f"key server: KSWCRT {identity['work_certificate_serial'][:16]}… under KSRCRT")

    directory, sn = env.workdir / "pos-terminal", "DEMO-POS-0001"
    PosTerminal.factory(directory, sn, root_pem=identity["ksrcrt_pem"].encode())
    console.print(f"factory: {sn} made, TKP (P-256) generated inside its SCM, KSRCRT preloaded")
    report = _request(
        env,
        "POST",
        "/v1/tmk/terminals/import",
        tokens["manufacturer"],
        content=(directory / "record.ndjson").read_bytes(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    console.print(f"import: {report['accepted']} registered, {len(report['rejected'])} rejected")

    terminal = PosTerminal.open(directory)
    gateway = HttpTransport(env.client, tokens["device-gateway"])
    result = terminal.download(gateway, crls=[terminal.fetch_crl(gateway)])
    console.print(
        f"download: TMK {result.algorithm.value} active, KCV {result.kcv.hex().upper()}"
        " (server and terminal agree)"
    )
    for usage in ("P0", "M3"):
        issued = _request(
            env,
            "POST",
            f"/v1/tmk/terminals/{sn}/working-keys",
            tokens["operator"],
            json={"usage": usage},
        )
        received = terminal.install_working_key(issued["key_block"], usage)
        console.print(
            f"working key {usage}: TR-31 {issued['key_block'][:16]}…, mode"
            f" {received.mode_of_use}, KCV {received.kcv.hex().upper()} = {issued['kcv']}"
        )
    block = terminal.encrypt_pin("1234", DEMO_PAN)
    console.print(f"terminal: PIN block (ISO 9564 format 4) {block.hex().upper()}")
    for pin in ("1234", "9999"):
        verdict = _request(
            env,
            "POST",
            f"/v1/tmk/terminals/{sn}/pin-blocks/verify",
            tokens["operator"],
            json={"pin_block": block.hex(), "pan": DEMO_PAN, "pin": pin},
        )
        console.print(f"server: the block carries PIN {pin}? {verdict['match']}")
