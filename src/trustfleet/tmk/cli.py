"""trustfleet tmk (the key server's side, through the API: a running server with
--server, else the local data directory) and trustfleet emulate pos (the reference POS
terminal, over HTTP), plus the demo step."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_der_x509_crl
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.pinblock import check_pan, check_pin
from trustfleet.errors import InvalidInput
from trustfleet.kit.cli import (
    EXIT_REFUSED,
    UsageProblem,
    api,
    console,
    emit,
    err_console,
    read_input_file,
    server_required,
    state,
    wrapping_table,
)
from trustfleet.pki.x509 import RevocationReason
from trustfleet.tmk.conformance import SUITES as CONFORMANCE_SUITES
from trustfleet.tmk.conformance import CheckResult, Conformance, Report, load_tokens
from trustfleet.tmk.errors import ScmExists, TmkInvalidTerminalRecord, TmkServerRefused
from trustfleet.tmk.protocol import PROTOCOL_VERSION, PROTOCOL_VERSIONS
from trustfleet.tmk.registry import SN_PATTERN
from trustfleet.tmk.terminal import (
    DEVICE_KEY_FILE,
    IDENTITY_PATH,
    KSRCRT_CRL_PATH,
    HttpTransport,
    PosTerminal,
)
from trustfleet.tmk.working_keys import WORKING_KEY_USAGES

if TYPE_CHECKING:
    from trustfleet.kit.demo import DemoEnv

app = typer.Typer(no_args_is_help=True, help="POS terminals: registry, TMKs, working keys.")
identity_app = typer.Typer(
    no_args_is_help=True, help="The key server's identity: KSRCRT and the work certificate."
)
app.add_typer(identity_app, name="identity")
pos_app = typer.Typer(no_args_is_help=True, help="The reference POS terminal (emulator).")

DEFAULT_POS_DIR = Path("pos-terminal")
TKP_ALGORITHMS = {"p256": "ec-p256", "rsa-2048": "rsa-2048", "rsa-3072": "rsa-3072", "sm2": "sm2"}
DEMO_PAN = "4111111111111111"
UPLOAD_BATCH_RECORDS = 1000
IMPORT_MEDIA_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}


def _sn(value: str | None) -> str | None:
    if value is not None and not SN_PATTERN.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a serial number: 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return value


SnArgument = Annotated[str, typer.Argument(help="Serial number.", callback=_sn)]


class TmkAlgorithm(StrEnum):
    AES_128 = "aes-128"
    AES_256 = "aes-256"
    TDES = "tdes"


class Usage(StrEnum):
    P0 = "P0"
    M1 = "M1"
    M3 = "M3"
    D0 = "D0"


class Status(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class TkpAlgorithm(StrEnum):
    P256 = "p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    SM2 = "sm2"


# =====================================================================================
# trustfleet tmk: registry
# =====================================================================================


def _import_kind(path: Path, given: str | None) -> str:
    kind = given or {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}.get(path.suffix)
    if kind not in IMPORT_MEDIA_TYPES:
        raise UsageProblem(
            f"cannot tell the format of {path}: give --format csv or ndjson"
            " (or name the file .csv / .ndjson)"
        )
    return kind


def _text_lines(path: Path) -> Iterator[str]:
    """The file's lines as text; a file that is not UTF-8 is refused with its line."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise TmkInvalidTerminalRecord(
                    f"{path} is not UTF-8 text (line {number}, byte {exc.start + 1}: {exc.reason})",
                    hint="save the file as UTF-8",
                ) from None


def _records(path: Path, kind: str) -> Iterator[tuple[str, int]]:
    """The file as (text, records in it) pieces: a record is a CSV row (however many lines
    its quoted cells span; the header is not one) or a non-blank NDJSON line."""
    lines = _text_lines(path)
    if kind == "ndjson":
        for line in lines:
            yield line, 1 if line.strip() else 0
        return
    taken: list[str] = []

    def taking() -> Iterator[str]:
        for line in lines:
            taken.append(line)
            yield line

    reader = csv.reader(taking())
    first = True
    for _ in reader:
        yield "".join(taken), 0 if first else 1
        taken.clear()
        first = False
    if taken:
        yield "".join(taken), 0


def _count_records(path: Path, kind: str) -> int:
    try:
        return sum(count for _, count in _records(path, kind))
    except csv.Error as exc:
        raise TmkInvalidTerminalRecord(f"{path} is not valid CSV: {exc}") from None


def _upload(path: Path, kind: str, advance: Callable[[int], None]) -> Iterator[bytes]:
    batch: list[str] = []
    in_batch = 0
    for text, count in _records(path, kind):
        batch.append(text)
        in_batch += count
        if in_batch >= UPLOAD_BATCH_RECORDS:
            yield "".join(batch).encode()
            advance(in_batch)
            batch, in_batch = [], 0
    if batch:
        yield "".join(batch).encode()
    advance(in_batch)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@app.command("import")
def import_terminals(
    file: Annotated[Path, typer.Argument(help="CSV or NDJSON.")],
    file_format: Annotated[
        str | None, typer.Option("--format", help="csv or ndjson (default: by extension).")
    ] = None,
    rejections: Annotated[
        Path | None,
        typer.Option(help="Where to write rejected rows (default: FILE.rejections.ndjson)."),
    ] = None,
    allow_rejects: Annotated[
        bool,
        typer.Option("--allow-rejects", help="Exit 0 even when some rows were rejected."),
    ] = False,
) -> None:
    """Register terminals in bulk (committed 1,000 rows at a time). Re-importing a file
    changes nothing (an import cut short is finished by sending the file again);
    rejected rows are reported with their code and written to the rejections file, and
    the exit status is 1 when there are any (unless --allow-rejects)."""
    read_input_file(file, "the import file", probe=True)
    kind = _import_kind(file, file_format)
    total = _count_records(file, kind)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    client = api()
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("sending records", total=total)
        report = client.post(
            "/v1/tmk/terminals/import",
            content=_upload(file, kind, lambda n: progress.advance(task, n)),
            headers={"Content-Type": IMPORT_MEDIA_TYPES[kind]},
        )
    out = rejections or file.with_name(file.name + ".rejections.ndjson")
    if report["rejected"]:
        with out.open("w", encoding="utf-8") as sink:
            for row in report["rejected"]:
                sink.write(json.dumps(row) + "\n")

    def text() -> None:
        console.print(
            f"{_plural(report['rows'], 'row')}: {report['accepted']} registered,"
            f" {report['unchanged']} unchanged, {len(report['rejected'])} rejected"
        )
        if report["rejected"]:
            codes: dict[str, int] = {}
            for rejected in report["rejected"]:
                codes[rejected["code"]] = codes.get(rejected["code"], 0) + 1
            table = wrapping_table("code", "rows")
            for code, count in sorted(codes.items()):
                table.add_row(code, str(count))
            console.print(table)
            console.print(f"rejected rows written to {escape(str(out))}")

    emit(report, text)
    if report["rejected"] and not allow_rejects:
        raise typer.Exit(EXIT_REFUSED)


def _record_file(path: Path) -> dict[str, Any]:
    """The first record of a factory record file (``record.ndjson``)."""
    for number, line in enumerate(read_input_file(path, "the record file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise TmkInvalidTerminalRecord(f"{path} line {number} is not a JSON object")
        return record
    raise TmkInvalidTerminalRecord(f"{path} holds no record")


@app.command("register")
def register(
    record: Annotated[
        Path | None,
        typer.Argument(help="A factory record (record.ndjson from `emulate pos factory`)."),
    ] = None,
    sn: Annotated[str | None, typer.Option(help="Serial number.", callback=_sn)] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="TKP_Pu: PEM, or base64 of the DER.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Terminal model.")] = None,
) -> None:
    """Register one terminal: from its factory record, or from --sn and --public-key."""
    if record is not None:
        if sn is not None or public_key is not None:
            raise UsageProblem("give a record file, or --sn and --public-key, not both")
        body = {k: v for k, v in _record_file(record).items() if k in ("sn", "model", "public_key")}
        if model is not None:
            body["model"] = model
    elif sn is not None and public_key is not None:
        key = read_input_file(public_key, "--public-key").decode("utf-8", errors="replace")
        body = {"sn": sn, "model": model or "", "public_key": key}
    else:
        raise UsageProblem("give a record file (record.ndjson), or --sn and --public-key")
    registered = api().post("/v1/tmk/terminals", json=body)
    emit(
        registered,
        lambda: console.print(
            f"terminal {escape(registered['sn'])} registered ({registered['key_algorithm']})"
        ),
    )


def _print_overview(view: dict[str, Any]) -> None:
    table = wrapping_table("field", "value", show_header=False)
    table.add_row("sn", escape(view["sn"]))
    table.add_row("model", escape(view["model"]))
    table.add_row("status", view["status"])
    table.add_row("TKP", view["key_algorithm"])
    tmk = view["active_tmk"]
    table.add_row("TMK", f"{tmk['algorithm']}, KCV {tmk['kcv']}" if tmk else "none")
    table.add_row(
        "next TMK",
        view["tmk_algorithm"] + (" (rotation requested)" if view["rotation_requested"] else ""),
    )
    for key in view["working_keys"]:
        table.add_row(
            f"working key {key['usage']}",
            f"{key['algorithm']} v{key['key_version']}, KCV {key['kcv']}",
        )
    console.print(table)


def _overview(view: dict[str, Any]) -> None:
    emit(view, lambda: _print_overview(view))


@app.command("show")
def show(sn: SnArgument) -> None:
    """A terminal's status, TMK and working keys (KCVs only)."""
    _overview(api().get(f"/v1/tmk/terminals/{sn}"))


@app.command("list")
def list_terminals(
    status: Annotated[Status | None, typer.Option(help="Only terminals in this status.")] = None,
    model: Annotated[str | None, typer.Option(help="Only terminals of this model.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Terminals per page.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="The next page's cursor.")] = None,
) -> None:
    """Registered terminals in SN order, one page at a time."""
    page = api().get(
        "/v1/tmk/terminals",
        status=status.value if status else None,
        model=model,
        limit=limit,
        cursor=cursor,
    )

    def text() -> None:
        table = wrapping_table("sn", "model", "TKP", "status", "registered")
        for terminal in page["items"]:
            table.add_row(
                escape(terminal["sn"]),
                escape(terminal["model"]),
                terminal["key_algorithm"],
                terminal["status"],
                terminal["created_at"][:19],
            )
        console.print(table)
        if page["next_cursor"]:
            err_console.print(f"more: --cursor {page['next_cursor']}", highlight=False)

    emit(page, text)


def _status_command(action: str) -> None:
    def command(
        sn: SnArgument,
        reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    ) -> None:
        _overview(api().post(f"/v1/tmk/terminals/{sn}/{action}", json={"reason": reason}))

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
    sn: SnArgument,
    algorithm: Annotated[
        TmkAlgorithm | None, typer.Option(help="The next TMK's algorithm (default: unchanged).")
    ] = None,
) -> None:
    """Allow the terminal's next download; it retires the current TMK and working keys."""
    body = {"algorithm": algorithm.value} if algorithm else {}
    _overview(api().post(f"/v1/tmk/terminals/{sn}/rotate-tmk", json=body))


@app.command("working-key")
def working_key(
    sn: SnArgument,
    usage: Annotated[Usage, typer.Option(help="P0 PIN, M1/M3 MAC, D0 data.")],
    out: Annotated[Path | None, typer.Option(help="Write the TR-31 block here.")] = None,
) -> None:
    """Issue a working key as a TR-31 block under the terminal's TMK."""
    issued = api().post(f"/v1/tmk/terminals/{sn}/working-keys", json={"usage": usage.value})
    if out:
        out.write_text(issued["key_block"] + "\n")

    def text() -> None:
        console.print(
            f"{issued['usage']} {issued['algorithm']} v{issued['key_version']}, KCV {issued['kcv']}"
        )
        if out:
            console.print(f"key block -> {escape(str(out))}")
        else:
            console.print(issued["key_block"], soft_wrap=True, highlight=False)

    emit(issued, text)


@app.command("sweep")
def sweep() -> None:
    """End expired downloads and destroy any key left retired or aborted."""
    report = api().post("/v1/tmk/sweep")
    emit(
        report,
        lambda: console.print(
            f"{report['sessions_aborted']} expired session(s) ended,"
            f" {report['keys_destroyed']} key(s) destroyed"
        ),
    )


@app.command("conformance")
def conformance(
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="The key server's API, to set up test terminals (default: --server).",
        ),
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
    wait_for_expiry: Annotated[
        bool, typer.Option(help="Wait out a session's lifetime to check the server expires it.")
    ] = True,
) -> None:
    """Run the scripted downloads, negative cases included, against the key server (or the
    gateway in front of it) given with --server, and print a pass/fail report (docs/tmk.md,
    "Conformance"). Exits 1 if any check fails."""
    if state.server is None:
        raise UsageProblem(
            "conformance needs the server terminals talk to: give --server URL",
            hint="trustfleet tmk conformance --server https://gateway.example:8443",
        )
    run = Conformance(
        state.server,
        load_tokens(tokens),
        api=api_url,
        suites=tuple(suite) if suite else tuple(CONFORMANCE_SUITES),
        wait_for_expiry=wait_for_expiry,
        progress=None if state.json_output else _print_check,
    )
    report = run.run()
    emit(report.to_dict(), lambda: _print_report(report))
    if not report.passed:
        raise typer.Exit(EXIT_REFUSED)


_OUTCOME_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def _print_check(result: CheckResult) -> None:
    style = _OUTCOME_STYLE[result.outcome]
    console.print(f"[{style}]{result.outcome:4}[/] {escape(result.name)} ({escape(result.suite)})")


def _print_report(report: Report) -> None:
    table = wrapping_table("check", "suite", "expected", "got", "result")
    table.title = "TMK conformance"
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


def _print_identity(identity: dict[str, Any], status: str = "active") -> None:
    console.print(
        f"work certificate {identity['work_certificate_serial']}"
        f" ({identity['work_key_algorithm']}, {status}),"
        f" valid until {identity['not_after'][:10]}"
    )


@identity_app.command("init")
def identity_init() -> None:
    """Make KSRCRT and a first work certificate (if missing)."""
    identity = api().post("/v1/tmk/identity")
    emit(identity, lambda: _print_identity(identity))


@identity_app.command("show")
def identity_show(
    root_out: Annotated[
        Path | None, typer.Option(help="Write KSRCRT (PEM) here, for terminal factories.")
    ] = None,
) -> None:
    """The current work certificate; with --root-out, KSRCRT for terminal factories."""
    identity = api(token_required=False).get(IDENTITY_PATH)
    if root_out:
        root_out.write_text(identity["ksrcrt_pem"])

    def text() -> None:
        _print_identity(identity)
        if root_out:
            console.print(f"KSRCRT -> {escape(str(root_out))}")

    emit(identity, text)


@identity_app.command("list")
def identity_list() -> None:
    """Every work certificate the key server has had, oldest first."""
    history = api().get("/v1/tmk/identity/history")

    def text() -> None:
        for identity in history:
            _print_identity(identity, identity["status"])

    emit(history, text)


@identity_app.command("rotate-work-cert")
def identity_rotate() -> None:
    """New work key and certificate under the same KSRCRT (terminals unchanged)."""
    identity = api().post("/v1/tmk/identity/rotate-work-cert")
    emit(identity, lambda: _print_identity(identity))


@identity_app.command("revoke-work-cert")
def identity_revoke(
    reason: Annotated[
        RevocationReason, typer.Option(help="RFC 5280 reason.")
    ] = RevocationReason.KEY_COMPROMISE,
) -> None:
    """Revoke the current work certificate (KSRCRT's CRL lists it) and issue a new one."""
    answer = api().post("/v1/tmk/identity/revoke-work-cert", json={"reason": reason.value})

    def text() -> None:
        console.print(f"revoked {answer['revoked_serial']} ({reason.value})")
        _print_identity(answer["identity"])

    emit(answer, text)


@identity_app.command("crl")
def identity_crl(out: Annotated[Path, typer.Option(help="Where to write the CRL (PEM).")]) -> None:
    """KSRCRT's current CRL, for terminals that are loaded offline."""
    der = api(token_required=False).get_bytes(KSRCRT_CRL_PATH)
    out.write_bytes(load_der_x509_crl(der).public_bytes(Encoding.PEM))
    console.print(f"KSRCRT CRL -> {escape(str(out))}")


# =====================================================================================
# trustfleet emulate pos
# =====================================================================================

PosDir = Annotated[Path, typer.Option("--dir", help="The terminal's directory.")]
#: the old --token flag: refused with a clear error (a token on the command line shows in
#: ps and in the shell's history)
OldTokenFlag = Annotated[str | None, typer.Option("--token", hidden=True)]


def _no_token_flag(token: str | None) -> None:
    if token is not None:
        raise UsageProblem(
            "--token is not accepted: a token on the command line shows in `ps` and in the"
            " shell's history",
            hint="set TRUSTFLEET_TOKEN, or run `trustfleet login --server URL`",
        )


def _open(directory: Path) -> PosTerminal:
    if not (directory / DEVICE_KEY_FILE).is_file():
        raise UsageProblem(
            f"{directory} holds no terminal (no {DEVICE_KEY_FILE})",
            hint="make one with `trustfleet emulate pos factory --out DIR`, or give --dir",
        )
    return PosTerminal.open(directory)


def _fetch_root() -> bytes:
    identity = json.loads(HttpTransport(api(token_required=False).http, "").get(IDENTITY_PATH))
    return str(identity["ksrcrt_pem"]).encode()


def _transport() -> HttpTransport:
    server_required("this step", of="key server")
    return HttpTransport(api().http, "")  # the client carries the token


def _refused_hint(exc: TmkServerRefused, role: str) -> TmkServerRefused:
    if exc.http_status in (401, 403):
        exc.extra["hint"] = f"TRUSTFLEET_TOKEN (or the login file) must hold a {role} token"
    return exc


@pos_app.command("factory")
def pos_factory(
    sn: Annotated[str, typer.Option(help="Hardware serial number.", callback=_sn)],
    out: Annotated[Path, typer.Option(help="The new terminal's directory.")] = DEFAULT_POS_DIR,
    algorithm: Annotated[
        TkpAlgorithm, typer.Option(help="The TKP's algorithm.")
    ] = TkpAlgorithm.P256,
    model: Annotated[str, typer.Option(help="Terminal model.")] = "trustfleet-reference-terminal",
    root: Annotated[
        Path | None,
        typer.Option(help="KSRCRT (PEM) to preload; default: fetched from --server if given."),
    ] = None,
) -> None:
    """Make a terminal: TKP generated in its SCM, KSRCRT preloaded, and the record
    (record.ndjson) for `trustfleet tmk import` or `trustfleet tmk register`."""
    root_pem = read_input_file(root, "--root") if root else None
    if root_pem is None and state.server is not None:
        root_pem = _fetch_root()
    if (out / DEVICE_KEY_FILE).exists():
        raise ScmExists(
            f"{out / DEVICE_KEY_FILE} exists: {out} already holds a terminal",
            hint="choose another --out, or remove that directory to make it again",
        )
    PosTerminal.factory(
        out, sn, KeyAlgorithm(TKP_ALGORITHMS[algorithm.value]), model=model, root_pem=root_pem
    )
    console.print(f"terminal {escape(sn)} made in {escape(str(out))}")
    console.print(f"factory record: {escape(str(out / 'record.ndjson'))}")
    if root_pem is None:
        console.print(
            "no KSRCRT preloaded: load it before downloading with"
            f" `trustfleet emulate pos install-root --dir {escape(str(out))} --root FILE`"
            " (or --server URL)"
        )


@pos_app.command("install-root")
def pos_install_root(
    directory: PosDir = DEFAULT_POS_DIR,
    root: Annotated[
        Path | None, typer.Option(help="KSRCRT (PEM); default: fetched from --server.")
    ] = None,
) -> None:
    """Load KSRCRT into a terminal made without it (a factory step: the terminal trusts
    the root it holds; fetched from --server, it trusts whoever answers there)."""
    terminal = _open(directory)
    if root is not None:
        pem = read_input_file(root, "--root")
    else:
        server_required("install-root without --root", of="key server")
        pem = _fetch_root()
    certificate = terminal.install_root(pem)
    console.print(
        f"KSRCRT {certificate.subject.rfc4514_string()} loaded into {escape(str(directory))}"
    )


@pos_app.command("download")
def pos_download(
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
    token: OldTokenFlag = None,
) -> None:
    """Download a TMK from the key server (mutual authentication, then key transport) with
    the device gateway's token (TRUSTFLEET_TOKEN or the login file)."""
    _no_token_flag(token)
    terminal = _open(directory)
    if not terminal.roots:
        raise UsageProblem(
            f"{directory} holds no KSRCRT: it cannot authenticate the key server",
            hint=f"trustfleet emulate pos install-root --dir {directory} --root FILE",
        )
    transport = _transport()
    try:
        crls = [terminal.fetch_crl(transport)] if crl else []
        result = terminal.download(transport, crls=crls, version=protocol_version)
    except TmkServerRefused as exc:
        raise _refused_hint(exc, "device-gateway") from None
    console.print(
        f"TMK {result.algorithm.value} active (KCV {result.kcv.hex().upper()}),"
        f" session {result.session_id}, protocol version {protocol_version}"
    )


@pos_app.command("working-keys")
def pos_working_keys(
    usage: Annotated[list[Usage], typer.Option(help="P0, M1, M3 or D0 (repeatable).")],
    directory: PosDir = DEFAULT_POS_DIR,
    token: OldTokenFlag = None,
) -> None:
    """Fetch working keys for this terminal from the TMS API (an operator token in
    TRUSTFLEET_TOKEN or the login file) and install them; each block must authenticate
    under the TMK and carry a usage and mode this terminal accepts."""
    _no_token_flag(token)
    terminal = _open(directory)
    transport = _transport()
    for wanted in usage:
        assert wanted.value in WORKING_KEY_USAGES
        body = json.dumps({"usage": wanted.value}).encode()
        try:
            issued = json.loads(
                transport.post(f"/v1/tmk/terminals/{terminal.sn}/working-keys", body)
            )
        except TmkServerRefused as exc:
            raise _refused_hint(exc, "operator") from None
        received = terminal.install_working_key(issued["key_block"], wanted.value)
        console.print(
            f"{wanted.value} installed: {received.algorithm.value}, mode {received.mode_of_use},"
            f" v{received.key_version}, KCV {received.kcv.hex().upper()}"
        )


def _pin(value: str) -> str:
    try:
        return check_pin(value)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.message) from None


def _pan(value: str) -> str:
    try:
        return check_pan(value)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.message) from None


@pos_app.command("pin")
def pos_pin(
    pin: Annotated[str, typer.Option(help="The cardholder's PIN (4-12 digits).", callback=_pin)],
    pan: Annotated[str, typer.Option(help="The card number (12-19 digits).", callback=_pan)],
    directory: PosDir = DEFAULT_POS_DIR,
) -> None:
    """Encrypt a PIN block under the terminal's P0 key and print it (hex)."""
    console.print(_open(directory).encrypt_pin(pin, pan).hex().upper())


@pos_app.command("show")
def pos_show(directory: PosDir = DEFAULT_POS_DIR) -> None:
    """SN, TMK and working keys of the terminal (KCVs only)."""
    terminal = _open(directory)
    scm = terminal.scm
    console.print(f"sn {escape(scm.sn)}, TKP {scm.algorithm.value}")
    if scm.has_tmk:
        console.print(f"TMK {scm.tmk_algorithm.value}, KCV {scm.tmk_kcv.hex().upper()}")
    for usage, key in terminal.working_keys().items():
        console.print(f"{usage}: {key.algorithm.value}, KCV {key.kcv.hex().upper()}")


# =====================================================================================
# The demo step
# =====================================================================================


def demo_step(env: DemoEnv) -> None:
    """factory -> import -> download -> working keys -> a PIN block from the terminal,
    deciphered on the server side."""
    console.rule("[bold]tmk: POS terminal master key download and working keys")
    tokens = env.tokens("tmk", "manufacturer", "device-gateway", "operator")
    identity = env.call("POST", "/v1/tmk/identity", env.admin_token)
    console.print(f"key server: KSWCRT {identity['work_certificate_serial'][:16]}… under KSRCRT")

    directory, sn = env.workdir / "pos-terminal", "DEMO-POS-0001"
    PosTerminal.factory(directory, sn, root_pem=identity["ksrcrt_pem"].encode())
    console.print(f"factory: {sn} made, TKP (P-256) generated inside its SCM, KSRCRT preloaded")
    report = env.call(
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
        issued = env.call(
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
        verdict = env.call(
            "POST",
            f"/v1/tmk/terminals/{sn}/pin-blocks/verify",
            tokens["operator"],
            json={"pin_block": block.hex(), "pan": DEMO_PAN, "pin": pin},
        )
        console.print(f"server: the block carries PIN {pin}? {verdict['match']}")
