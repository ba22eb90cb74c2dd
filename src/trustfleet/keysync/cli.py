"""``trustfleet keysync`` (management verbs, thin clients of the HTTP API),
``trustfleet emulate m2m`` (the reference terminal), ``trustfleet platform-receiver`` (the
reference application platform) and the demo step.

Management verbs are clients of the HTTP API like every other verb: ``--server`` /
``$TRUSTFLEET_ADDR`` with the token of ``$TRUSTFLEET_TOKEN`` or the login file (never the
command line), or the local data directory; secrets they send (a gateway's) are read from
the environment or prompted for.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from trustfleet.errors import InvalidInput
from trustfleet.keysync.terminal import M2mTerminal, post_sms, sync_over_http
from trustfleet.kit.cli import (
    checked,
    console,
    emit,
    http_api,
    server_required,
    state,
    wrapping_table,
)
from trustfleet.kit.client import problem_of
from trustfleet.kit.credentials import token_for

if TYPE_CHECKING:
    from trustfleet.kit.demo import DemoEnv

app = typer.Typer(no_args_is_help=True, help="M2M key sync: imports, registrations, platforms.")
platform_app = typer.Typer(no_args_is_help=True, help="Application platforms.")
gateway_app = typer.Typer(no_args_is_help=True, help="SMS gateways.")
app.add_typer(platform_app, name="platform")
app.add_typer(gateway_app, name="gateway")
m2m_app = typer.Typer(no_args_is_help=True, help="The reference M2M terminal (emulator).")
receiver_app = typer.Typer(
    no_args_is_help=True, help="The reference application platform receiver."
)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".manifest": "manifest"}
MEDIA = {
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "manifest": "application/x-keysync-manifest",
}
GATEWAY_SECRET_VARIABLE = "TRUSTFLEET_GATEWAY_SECRET"  # noqa: S105 - a variable's name
VERIFIER_VARIABLE = "TRUSTFLEET_WEBHOOK_VERIFIER"
POLL_SECONDS = 0.5
UPLOAD_SECONDS = 3600  # a large import answers once its last batch is committed


def _secret(variable: str, prompt: str) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    return str(typer.prompt(prompt, hide_input=True))


# =====================================================================================
# trustfleet keysync import
# =====================================================================================


class RowsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s")


def _digest_and_rows(path: Path, kind: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    rows = 0
    with path.open("rb") as handle:
        for line in handle:
            digest.update(line)
            rows += bool(line.strip())
    return digest.hexdigest(), max(rows - 1, 0) if kind == "csv" else rows


@app.command("import")
def import_keys(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The key file.")],
    file_format: Annotated[
        str | None,
        typer.Option("--format", help="csv, jsonl or manifest (default: by extension)."),
    ] = None,
    import_id: Annotated[
        str | None, typer.Option("--id", help="Import ID (default: the file's SHA-256).")
    ] = None,
    rejections: Annotated[
        Path | None, typer.Option(help="Write rejected rows here (default FILE.rejections.jsonl).")
    ] = None,
) -> None:
    """Import terminal keys (manufacturer token). Run it again after a crash: the import
    resumes after its last committed batch; a finished one changes nothing."""
    kind = file_format or FORMATS.get(file.suffix.lower())
    if kind not in MEDIA:
        raise InvalidInput("give --format csv, jsonl or manifest")
    digest, total = _digest_and_rows(file, kind)
    chosen = import_id or digest[:32]
    result: dict[str, Any] = {}
    api = http_api()

    def upload() -> None:
        try:
            with file.open("rb") as body:
                result["answer"] = api.put(
                    f"/v1/keysync/imports/{chosen}",
                    content=body,
                    headers={"Content-Type": MEDIA[kind]},
                    timeout=UPLOAD_SECONDS,
                )
        except httpx.HTTPError as exc:
            result["error"] = exc

    sender = threading.Thread(target=upload, daemon=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        RowsPerSecond(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=state.json_output) as progress:
        task = progress.add_task("importing keys", total=total)
        sender.start()
        while sender.is_alive():
            sender.join(POLL_SECONDS)
            seen = api.get(f"/v1/keysync/imports/{chosen}")
            if seen.status_code == 200:
                progress.update(task, completed=seen.json()["rows_done"])
        if "error" in result:
            raise result["error"]
        report = checked(result["answer"])
        progress.update(task, completed=report["rows_done"])
    if report["rejected"]:
        out = rejections or file.with_name(file.name + ".rejections.jsonl")
        _write_rejections(api, chosen, out)
        report["rejections_file"] = str(out)
    if state.json_output:
        emit(report, lambda: None)
        return
    console.print(
        f"import {chosen}: {report['accepted']} accepted, {report['unchanged']} unchanged,"
        f" {report['rejected']} rejected"
    )
    if report["rejected"]:
        codes: dict[str, int] = {}
        for row in report["rejections"]:
            codes[row["code"]] = codes.get(row["code"], 0) + 1
        table = wrapping_table("code", "rows (first 100 rejected)")
        for code, n in sorted(codes.items()):
            table.add_row(code, str(n))
        console.print(table)
        console.print(f"rejected rows written to {escape(report['rejections_file'])}")


def _write_rejections(api: httpx.Client, import_id: str, out: Path) -> None:
    after = 0
    with out.open("w", encoding="utf-8") as sink:
        while True:
            page = checked(
                api.get(
                    f"/v1/keysync/imports/{import_id}/rejections",
                    params={"after_row": after, "limit": 10_000},
                )
            )
            for row in page:
                sink.write(json.dumps(row) + "\n")
            if len(page) < 10_000:
                return
            after = page[-1]["row"]


@app.command("import-status")
def import_status(import_id: str) -> None:
    """An import's progress and counts."""
    api = http_api()
    report = checked(api.get(f"/v1/keysync/imports/{import_id}"))
    table = wrapping_table("field", "value", show_header=False)
    for key in ("id", "format", "status", "rows_done", "accepted", "unchanged", "rejected"):
        table.add_row(key, str(report[key]))
    emit(report, lambda: console.print(table))


@app.command("import-key")
def import_key(
    out: Annotated[Path | None, typer.Option(help="Write the PEM here.")] = None,
) -> None:
    """The public key signed manifests seal key values to."""
    api = http_api()
    answer = checked(api.get("/v1/keysync/import-key"))
    if out:
        out.write_text(answer["public_key_pem"])
        console.print(f"import public key ({answer['hpke']}) -> {escape(str(out))}")
    else:
        console.print(answer["public_key_pem"], highlight=False)


@app.command("manufacturer-key")
def manufacturer_key(
    kid: Annotated[str, typer.Option(help="The key ID manifests name (JWS kid).")],
    manufacturer: Annotated[str, typer.Option(help="Who signs with it.")],
    public_key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="PEM.")],
) -> None:
    """Register a manufacturer's manifest signing key (admin token)."""
    api = http_api()
    answer = checked(
        api.post(
            "/v1/keysync/manufacturer-keys",
            json={
                "kid": kid,
                "manufacturer": manufacturer,
                "public_key_pem": public_key.read_text(),
            },
        )
    )
    console.print(
        f"manifest signing key {escape(answer['kid'])} ({answer['algorithm']}) registered"
    )


# =====================================================================================
# trustfleet keysync register / show / deregister
# =====================================================================================


def _print_subscriber(view: dict[str, Any]) -> None:
    table = wrapping_table("field", "value", show_header=False)
    table.add_row("mdn", view["mdn"])
    table.add_row("terminal", escape(view["terminal_id"] or "(not bound yet)"))
    table.add_row("applications", escape(", ".join(view["application_ids"]) or "-"))
    for binding in view["bindings"]:
        table.add_row(
            f"bound {escape(binding['application_id'])}",
            f"key {escape(binding['key_id'])}, delivery {binding['delivery_id']}",
        )
    emit(view, lambda: console.print(table))


@app.command("register")
def register(
    mdn: Annotated[str, typer.Argument(help="The MDN (E.164).")],
    application: Annotated[list[str], typer.Option("--app", help="Application ID (repeat).")],
    terminal: Annotated[str | None, typer.Option(help="Bind the MDN to this terminal now.")] = None,
) -> None:
    """Register an MDN for applications (operator token)."""
    api = http_api()
    view = checked(
        api.post(
            "/v1/keysync/registrations",
            json={"mdn": mdn, "application_ids": application, "terminal_id": terminal},
        )
    )
    _print_subscriber(view)


@app.command("show")
def show(mdn: str) -> None:
    """An MDN's applications, terminal and bindings (operator token)."""
    api = http_api()
    view = checked(api.get(f"/v1/keysync/registrations/{mdn.lstrip('+')}"))
    _print_subscriber(view)


@app.command("deregister")
def deregister(
    mdn: str,
    application: Annotated[str | None, typer.Option("--app", help="Only this one.")] = None,
) -> None:
    """Remove registrations (all, and the terminal binding, without --app)."""
    params = {"application_id": application} if application else {}
    api = http_api()
    view = checked(api.delete(f"/v1/keysync/registrations/{mdn.lstrip('+')}", params=params))
    _print_subscriber(view)


# =====================================================================================
# trustfleet keysync platform / gateway
# =====================================================================================


@platform_app.command("add")
def platform_add(
    application: Annotated[str, typer.Argument(help="Application ID.")],
    url: Annotated[str, typer.Option(help="The platform's webhook URL.")],
    hpke_public_key: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="X25519 or P-256 public key (PEM).")
    ],
    signing: Annotated[str, typer.Option(help="v1a (Ed25519) or v1 (HMAC).")] = "v1a",
) -> None:
    """Register or replace an application's platform (admin token). Prints what the
    platform verifies requests with (a v1 secret is shown only now)."""
    api = http_api()
    view = checked(
        api.put(
            f"/v1/keysync/platforms/{application}",
            json={
                "url": url,
                "hpke_public_key_pem": hpke_public_key.read_text(),
                "signing": signing,
            },
        )
    )
    console.print(f"platform {escape(application)} -> {escape(view['url'])} ({view['hpke']})")
    console.print("the platform verifies our requests with:")
    console.print(view["verifier"], soft_wrap=True, highlight=False)


@platform_app.command("list")
def platform_list() -> None:
    """Platforms (admin or operator token)."""
    api = http_api()
    rows = checked(api.get("/v1/keysync/platforms"))
    table = wrapping_table("application", "url", "signing", "hpke")
    for row in rows:
        table.add_row(
            escape(row["application_id"]), escape(row["url"]), row["signing"], row["hpke"]
        )
    emit(rows, lambda: console.print(table))


@platform_app.command("deliveries")
def platform_deliveries(
    application: str,
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
) -> None:
    """An application's deliveries, newest first."""
    params = {"status": status} if status else {}
    api = http_api()
    rows = checked(api.get(f"/v1/keysync/platforms/{application}/deliveries", params=params))
    table = wrapping_table("delivery", "status", "attempts", "last error", "created")
    for row in rows:
        table.add_row(
            row["id"], row["status"], str(row["attempts"]), escape(row["last_error"] or ""),
            row["created_at"],
        )  # fmt: skip
    emit(rows, lambda: console.print(table))


def _pause(application: str, paused: bool) -> None:
    verb = "pause" if paused else "resume"
    api = http_api()
    view = checked(api.post(f"/v1/keysync/platforms/{application}/{verb}"))
    console.print(f"{escape(application)}: {verb}d, {view['pending']} pending")


@platform_app.command("pause")
def platform_pause(application: str) -> None:
    """No deliveries to this platform until resumed."""
    _pause(application, True)


@platform_app.command("resume")
def platform_resume(application: str) -> None:
    """Deliveries to this platform start again."""
    _pause(application, False)


@gateway_app.command("add")
def gateway_add(
    name: Annotated[str, typer.Argument(help="Gateway name (a-z 0-9 -).")],
    webhook_url: Annotated[str, typer.Option(help="This server's webhook URL as it calls it.")],
    reply_url: Annotated[str | None, typer.Option(help="Its outbound messages API.")] = None,
    reply_account: Annotated[str | None, typer.Option(help="Account for that API.")] = None,
    reply_from: Annotated[str | None, typer.Option(help="The number replies come from.")] = None,
) -> None:
    """Register or replace an SMS gateway (admin token); its secret (auth token) is read
    from $TRUSTFLEET_GATEWAY_SECRET or prompted for."""
    secret = _secret(GATEWAY_SECRET_VARIABLE, "gateway secret (auth token)")
    api = http_api()
    checked(
        api.put(
            f"/v1/keysync/gateways/{name}",
            json={
                "webhook_url": webhook_url,
                "secret": secret,
                "reply_url": reply_url,
                "reply_account": reply_account,
                "reply_from": reply_from,
            },
        )
    )
    console.print(f"gateway {escape(name)}: point its inbound-SMS webhook at {escape(webhook_url)}")


# =====================================================================================
# trustfleet emulate m2m
# =====================================================================================

TerminalDir = Annotated[Path, typer.Option("--dir", help="The terminal's directory.")]
DEFAULT_DIR = Path("m2m-terminal")


def _load_private(path: Path) -> Any:
    return load_pem_private_key(path.read_bytes(), password=None)


@m2m_app.command("factory")
def m2m_factory(
    terminal_id: Annotated[str, typer.Option(help="The terminal's ID (serial number).")],
    mdn: Annotated[str, typer.Option(help="Its SIM's MDN (E.164).")],
    application: Annotated[
        list[str], typer.Option("--app", help="One key per application (repeat).")
    ],
    out: TerminalDir = DEFAULT_DIR,
    kid: Annotated[str | None, typer.Option(help="Also sign a manifest with this kid.")] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="The manufacturer's signing key (PEM).")
    ] = None,
    import_key: Annotated[
        Path | None, typer.Option(help="The server's import public key (PEM).")
    ] = None,
) -> None:
    """Make a terminal with fresh keys and its factory record (record.csv, and
    record.manifest when --kid, --signing-key and --import-key are given)."""
    terminal = M2mTerminal.factory(out, terminal_id, mdn, list(application))
    (out / "record.csv").write_text(terminal.csv_rows())
    console.print(
        f"terminal {escape(terminal_id)} ({len(terminal.keys)} keys) in {escape(str(out))}"
    )
    console.print(f"factory record: {escape(str(out / 'record.csv'))}")
    if kid and signing_key and import_key:
        public = load_pem_public_key(import_key.read_bytes())
        if not isinstance(public, x25519.X25519PublicKey):
            raise InvalidInput("the import key is an X25519 public key")
        line = terminal.manifest_line(_load_private(signing_key), kid=kid, import_key=public)
        (out / "record.manifest").write_text(line + "\n")
        console.print(f"signed manifest: {escape(str(out / 'record.manifest'))}")


@m2m_app.command("request")
def m2m_request(
    directory: TerminalDir = DEFAULT_DIR,
    application: Annotated[str | None, typer.Option("--app")] = None,
) -> None:
    """Compose the next key-sync request and print it (the SMS body)."""
    console.print(M2mTerminal.open(directory).next_request(application_id=application).to_text())


@m2m_app.command("sms")
def m2m_sms(
    webhook: Annotated[str, typer.Option(help="The gateway webhook URL to post to.")],
    to: Annotated[str, typer.Option(help="The key management platform's SMS number.")],
    directory: TerminalDir = DEFAULT_DIR,
    application: Annotated[str | None, typer.Option("--app")] = None,
    signed_url: Annotated[
        str | None, typer.Option(help="The URL the gateway signs (default: --webhook).")
    ] = None,
) -> None:
    """Send the next request by SMS, posted as the gateway would ($TRUSTFLEET_GATEWAY_SECRET
    signs it)."""
    terminal = M2mTerminal.open(directory)
    request = terminal.next_request(application_id=application)
    secret = _secret(GATEWAY_SECRET_VARIABLE, "gateway secret")
    with httpx.Client(timeout=30) as http:
        answer = post_sms(
            http, webhook, terminal.sms_form(request, to=to), gateway_secret=secret,
            signed_url=signed_url,
        )  # fmt: skip
    if answer.status_code >= 400:
        raise problem_of(answer, local=False, where=webhook)
    console.print(f"sent {request.to_text()!r}: accepted")


@m2m_app.command("sync")
def m2m_sync(
    directory: TerminalDir = DEFAULT_DIR,
    application: Annotated[str | None, typer.Option("--app")] = None,
) -> None:
    """Send the next request over HTTP as a device gateway ($TRUSTFLEET_TOKEN)."""
    server = server_required("m2m sync")
    terminal = M2mTerminal.open(directory)
    request = terminal.next_request(application_id=application)
    http = http_api()  # the device gateway's token: $TRUSTFLEET_TOKEN or the login file
    bound = sync_over_http(http, token_for(server) or "", terminal, request)
    console.print(
        f"bound {escape(bound['key_id'])} for {escape(bound['application_id'])},"
        f" delivery {bound['delivery_id']}"
    )


@m2m_app.command("show")
def m2m_show(directory: TerminalDir = DEFAULT_DIR) -> None:
    """The terminal's ID, MDN and keys (IDs and counters, never the keys)."""
    terminal = M2mTerminal.open(directory)
    console.print(f"terminal {escape(terminal.terminal_id)}, MDN {terminal.mdn}")
    for k in terminal.keys:
        console.print(
            f"key {escape(k.key_id)} {k.algorithm} app={escape(k.application_id or '-')}"
            f" counter={k.counter}"
        )


# =====================================================================================
# trustfleet platform-receiver
# =====================================================================================

ReceiverDir = Annotated[Path, typer.Option("--dir", help="The receiver's directory.")]
HPKE_PRIVATE = "hpke.pem"
HPKE_PUBLIC = "hpke.pub.pem"


@receiver_app.command("init")
def receiver_init(directory: ReceiverDir = Path("platform-receiver")) -> None:
    """Make the platform's HPKE key pair (X25519); register hpke.pub.pem with
    `trustfleet keysync platform add`."""
    directory.mkdir(parents=True, exist_ok=True)
    private = x25519.X25519PrivateKey.generate()
    path = directory / HPKE_PRIVATE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (directory / HPKE_PUBLIC).write_bytes(public)
    console.print(f"HPKE public key: {escape(str(directory / HPKE_PUBLIC))}")


@receiver_app.command("run")
def receiver_run(
    application: Annotated[str, typer.Option("--app", help="The application ID it serves.")],
    directory: ReceiverDir = Path("platform-receiver"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
) -> None:
    """Receive key deliveries at /webhook: check the signature ($TRUSTFLEET_WEBHOOK_VERIFIER
    or the file `verifier` in --dir: whpk_... or whsec_...), open, deduplicate, store."""
    import uvicorn

    from trustfleet.keysync.receiver import ReceivedKeys, create_receiver_app

    text = os.environ.get(VERIFIER_VARIABLE) or (directory / "verifier").read_text().strip()
    private = _load_private(directory / HPKE_PRIVATE)
    keys = ReceivedKeys(directory / "keys.db")
    asgi = create_receiver_app(
        application_id=application,
        private_key=private,
        verifier=_verifier(text),
        keys=keys,
    )
    console.print(f"receiving {escape(application)} deliveries on http://{host}:{port}/webhook")
    uvicorn.run(asgi, host=host, port=port, log_level="warning")


def _verifier(text: str) -> Any:
    from trustfleet.kit.outbox.webhooks import (
        PUBLIC_KEY_PREFIX,
        Verifier,
        decode_public_key,
        decode_secret,
    )

    if text.startswith(PUBLIC_KEY_PREFIX):
        return Verifier(public_key=decode_public_key(text))
    return Verifier(secret=decode_secret(text))


# =====================================================================================
# The demo step
# =====================================================================================


def demo_step(env: DemoEnv) -> None:
    """Import (CSV and a signed manifest), register, a key-sync request by SMS and one over
    HTTP, two refused attacks, and the deliveries reaching a real receiver on localhost."""
    from trustfleet.keysync.receiver import (
        ReceivedKeys,
        ServedReceiver,
        create_receiver_app,
        free_port,
    )
    from trustfleet.kit.demo import step_title
    from trustfleet.kit.outbox import DeliveryWorker
    from trustfleet.kit.outbox.webhooks import Verifier, decode_public_key

    step_title("keysync: M2M key import, registration, SMS key sync, sealed push")
    tokens = env.tokens("keysync", "manufacturer", "operator", "device-gateway")
    app_id, work = "demo-meter-app", env.workdir / "keysync"
    platform_key = x25519.X25519PrivateKey.generate()
    port = free_port()
    platform = env.call(
        "PUT",
        f"/v1/keysync/platforms/{app_id}",
        json={
            "url": f"http://127.0.0.1:{port}/webhook",
            "hpke_public_key_pem": platform_key.public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            "signing": "v1a",
        },
    )
    keys = ReceivedKeys(work.parent / "platform-keys.db")
    asgi = create_receiver_app(
        application_id=app_id,
        private_key=platform_key,
        verifier=Verifier(public_key=decode_public_key(platform["verifier"])),
        keys=keys,
    )
    receiver = ServedReceiver(asgi, port).start()
    console.print(f"platform {app_id} at {receiver.url}/webhook: v1a (Ed25519), HPKE X25519")
    secret = secrets.token_hex(16)
    webhook = "http://testserver/v1/keysync/sms/demo-gateway"
    env.call(
        "PUT", "/v1/keysync/gateways/demo-gateway", json={"webhook_url": webhook, "secret": secret}
    )

    first = M2mTerminal.factory(work / "t1", "DEMO-M2M-0001", "+861440000000001", [app_id])
    report = env.call(
        "PUT", "/v1/keysync/imports/demo-csv", token=tokens["manufacturer"],
        content=first.csv_rows(), headers={"Content-Type": "text/csv"},
    )  # fmt: skip
    console.print(f"CSV import: {report['accepted']} key(s) accepted, stored sealed")
    maker = ed25519.Ed25519PrivateKey.generate()
    env.call(
        "POST", "/v1/keysync/manufacturer-keys",
        json={"kid": "demo-maker-1", "manufacturer": "Demo Devices",
              "public_key_pem": maker.public_key().public_bytes(
                  Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()},
    )  # fmt: skip
    import_key = load_pem_public_key(
        env.call("GET", "/v1/keysync/import-key", token=tokens["manufacturer"])[
            "public_key_pem"
        ].encode()
    )
    assert isinstance(import_key, x25519.X25519PublicKey)
    second = M2mTerminal.factory(
        work / "t2", "DEMO-M2M-0002", "+8613800138000", [app_id, "demo-other-app"]
    )
    line = second.manifest_line(maker, kid="demo-maker-1", import_key=import_key)
    report = env.call(
        "PUT", "/v1/keysync/imports/demo-manifest", token=tokens["manufacturer"],
        content=line + "\n", headers={"Content-Type": "application/x-keysync-manifest"},
    )  # fmt: skip
    console.print(
        f"signed manifest (EdDSA, keys HPKE-sealed to the import key): {report['accepted']}"
        " key(s) accepted"
    )
    for terminal in (first, second):
        env.call(
            "POST", "/v1/keysync/registrations", token=tokens["operator"],
            json={"mdn": terminal.mdn, "application_ids": [app_id]},
        )  # fmt: skip
    console.print(f"registered {first.mdn} (a 13-digit M2M number) and {second.mdn} for {app_id}")

    request = first.next_request()
    form = first.sms_form(request, to="+8610690000")
    answer = post_sms(env.client, webhook, form, gateway_secret=secret)
    console.print(f"SMS from {first.mdn}: {request.to_text()!r} -> HTTP {answer.status_code}")
    replayed = post_sms(env.client, webhook, form, gateway_secret=secret)
    console.print(f"the same SMS again: {replayed.json().get('code')}")
    forged = first.sms_form(request.__class__(request.key_id, None, request.counter + 1,
                                              bytes(8)), to="+8610690000")  # fmt: skip
    refused = post_sms(env.client, webhook, forged, gateway_secret=secret)
    console.print(f"a forged MAC: {refused.json().get('code')}")
    bound = sync_over_http(env.client, tokens["device-gateway"], second,
                           second.next_request(application_id=app_id))  # fmt: skip
    console.print(f"HTTP request via the device gateway: bound {bound['key_id']}")

    delivery = DeliveryWorker(env.context.db, env.context.keystore, timeout_seconds=5)
    deadline = time.monotonic() + 30
    while len(keys.all()) < 2 and time.monotonic() < deadline:
        delivery.run_once()
    delivery.close()
    receiver.stop()
    held = {k.key_id: k.key for t in (first, second) for k in t.keys}
    for stored in keys.all():
        console.print(
            f"platform stored {stored.key_id} for {stored.mdn}: matches the terminal's key:"
            f" {held.get(stored.key_id) == stored.key}"
        )
    keys.close()
