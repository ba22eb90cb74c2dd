"""Test harness shared across test folders: PostgreSQL schemas, real server nodes in
subprocesses, and the ``trustfleet`` command line run as a user runs it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from trustfleet.keystore.master import create_master_key_file
from trustfleet.server.auth import bootstrap_admin_token
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate

POSTGRES_URL = os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL", "")
STARTUP_SECONDS = 60

#: marks of a test that needs PostgreSQL (it is skipped only when no server is configured)
needs_postgres = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="TRUSTFLEET_TEST_POSTGRES_URL is not set"),
]


@contextmanager
def postgres_schema(prefix: str = "t_") -> Iterator[str]:
    """A URL to a fresh schema of the test PostgreSQL database, dropped afterwards."""
    schema = prefix + secrets.token_hex(6)
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def admin_token_for(database_url: str) -> str:
    """A fresh admin token in the database at ``database_url`` (migrated first)."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        return bootstrap_admin_token(Database(engine))
    finally:
        engine.dispose()


# -- server nodes ------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_environment(
    database_url: str, tmp_path: Path, *, master_key: bool = True
) -> dict[str, str]:
    """Environment of server nodes sharing one database and one master key file (none when
    ``master_key`` is false: add :func:`pkcs11_environment`)."""
    environment = {
        **os.environ,
        "TRUSTFLEET_DATABASE_URL": database_url,
        "TRUSTFLEET_LOG_LEVEL": "WARNING",
    }
    if master_key:
        path = tmp_path / "master.key"
        create_master_key_file(path)
        environment["TRUSTFLEET_MASTER_KEY_FILE"] = str(path)
    environment.pop("TRUSTFLEET_MASTER_KEY", None)
    environment.pop("TRUSTFLEET_CONFIG", None)
    return environment


def start_node(name: str, env: dict[str, str], data_dir: Path) -> Node:
    """``uvicorn --factory trustfleet.server.runner:app_from_env`` with trustfleet's HTTP
    protocol on a free loopback port."""
    port = free_port()
    data_dir.mkdir(mode=0o700, exist_ok=True)  # serve refuses one others can read
    log = data_dir / "server.log"
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "trustfleet.server.runner:app_from_env",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
        "--http", "trustfleet.server.protocol:HttpProtocol",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**env, "TRUSTFLEET_DATA_DIR": str(data_dir)}, stdout=out, stderr=out
        )
    return Node(name, f"http://127.0.0.1:{port}", process, log)


def wait_ready(node: Node, verify: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            pytest.fail(f"node {node.name} exited:\n{node.log.read_text()[-3000:]}")
        try:
            if httpx.get(node.url + "/readyz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"node {node.name} not ready:\n{node.log.read_text()[-3000:]}")


def stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@contextmanager
def running_nodes(env: dict[str, str], tmp_path: Path, count: int = 2) -> Iterator[list[Node]]:
    """``count`` ready server nodes on ``env``'s database, stopped afterwards."""
    started = [start_node(chr(ord("a") + i), env, tmp_path / f"node-{i}") for i in range(count)]
    try:
        for node in started:
            wait_ready(node)
        yield started
    finally:
        for node in started:
            stop(node)


# -- the command line --------------------------------------------------------------------


def cli_environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``trustfleet`` subprocess: ``data_dir`` as its data directory,
    none of the caller's server, token or login settings, a wide terminal."""
    env = {**os.environ, "TRUSTFLEET_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    for name in ("TRUSTFLEET_MASTER_KEY", "TRUSTFLEET_ADDR", "TRUSTFLEET_TOKEN",
                 "TRUSTFLEET_CACERT", "TRUSTFLEET_OUTPUT"):  # fmt: skip
        env.pop(name, None)
    env.setdefault("XDG_CONFIG_HOME", str(data_dir.parent / "config"))
    env.update(extra)
    return env


def run_cli(
    data_dir: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``trustfleet ARGS`` in a subprocess with ``data_dir`` as its data directory; ``env``
    adds variables, ``stdin`` is its standard input."""
    result = subprocess.run(
        [sys.executable, "-m", "trustfleet.cli", *args],
        capture_output=True,
        text=True,
        env=cli_environment(data_dir, **(env or {})),
        input=stdin if stdin is not None else "",
        timeout=180,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


# -- a SoftHSM2 token ----------------------------------------------------------------------

MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
INSTALL_HINT = (
    "run the README test command `scripts/dev test` (or `scripts/dev pytest`), which installs"
    " the Debian package softhsm2"
)
TOKEN_LABEL = "trustfleet-test"
USER_PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    user_pin: str


def find_softhsm_module() -> str:
    candidates = [os.environ.get("SOFTHSM2_MODULE", ""), *MODULE_PATHS]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(
        f"the SoftHSM2 PKCS#11 module was not found (set SOFTHSM2_MODULE or {INSTALL_HINT})"
    )


def init_softhsm_token(root: Path, label: str = TOKEN_LABEL) -> tuple[SoftHsmToken, Path]:
    """A fresh SoftHSM2 token in ``root`` (its own configuration file): the token and the
    file, which ``SOFTHSM2_CONF`` must name for every process that uses the token."""
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail(f"softhsm2-util is not installed: {INSTALL_HINT}")
    module = find_softhsm_module()
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    return SoftHsmToken(module, label, USER_PIN), conf


def pkcs11_environment(token: SoftHsmToken, conf: Path, policy: str = "sealed") -> dict[str, str]:
    """``TRUSTFLEET_*`` variables (and SoftHSM2's) of a node or command using ``token``."""
    return {
        "SOFTHSM2_CONF": str(conf),
        "TRUSTFLEET_KEYSTORE_BACKEND": "pkcs11",
        "TRUSTFLEET_PKCS11_MODULE": token.module,
        "TRUSTFLEET_PKCS11_TOKEN_LABEL": token.label,
        "TRUSTFLEET_PKCS11_USER_PIN": token.user_pin,
        "TRUSTFLEET_PKCS11_POLICY": policy,
    }


# -- an openCryptoki software token ------------------------------------------------------

OCK_MODULES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/opencryptoki/libopencryptoki.so",
)
OCK_SLOTD = "/usr/sbin/pkcsslotd"
OCK_PID_FILE = Path("/run/pkcsslotd.pid")
OCK_LABEL = "trustfleet-ock"
OCK_SO_PIN = "87654321"  # the soft token's factory SO PIN, which these tests never change
OCK_USER_PIN = "12345678"
OCK_SOFT_TOKEN_MODEL = "IBM SoftTok"


def _ock_module() -> str | None:
    return next((m for m in OCK_MODULES if Path(m).is_file()), None)


def _alive(pid: int) -> bool:
    """A live process (not a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _slotd_running() -> bool:
    try:
        return _alive(int(OCK_PID_FILE.read_text().strip()))
    except (OSError, ValueError):
        return False


def _stop_after_exit(pid: int) -> None:
    """Stop the slot daemon we started once this process has exited: pkcsslotd ignores
    SIGTERM while a process still has openCryptoki loaded, as this one does to the end."""
    me = os.getpid()
    script = (
        f"while [ -e /proc/{me} ] && ! grep -q '^State:.*Z' /proc/{me}/status; do"
        f" sleep 0.2; done; kill {pid}"
    )
    subprocess.Popen(  # noqa: S602 - a fixed script with two numbers
        script, shell=True, start_new_session=True, stdout=subprocess.DEVNULL
    )


@contextmanager
def opencryptoki_token() -> Iterator[SoftHsmToken]:
    """openCryptoki's software token, set up from nothing: the slot daemon started if it is
    not running (and stopped afterwards by its process id), the token initialised with the
    factory SO PIN and labelled for these tests. Skips, saying why, when that cannot be
    done; never touches a token some other application initialised."""
    import ctypes

    import pkcs11

    module = _ock_module()
    if module is None or not Path(OCK_SLOTD).is_file():
        pytest.skip("openCryptoki is not installed (Debian package opencryptoki)")
    started: int | None = None
    if not _slotd_running():
        done = subprocess.run([OCK_SLOTD], capture_output=True, text=True, check=False)
        deadline = time.monotonic() + 10
        while done.returncode == 0 and not _slotd_running() and time.monotonic() < deadline:
            time.sleep(0.1)  # it forks, then writes its pid file
        if done.returncode != 0 or not _slotd_running():
            pytest.skip(f"openCryptoki's pkcsslotd would not start: {done.stderr.strip()}")
        started = int(OCK_PID_FILE.read_text().strip())
    try:
        lib = pkcs11.lib(module)
        slot = next(
            (s for s in lib.get_slots() if s.get_token().model.strip() == OCK_SOFT_TOKEN_MODEL),
            None,
        )
        if slot is None:
            pytest.skip("openCryptoki has no software token slot (libpkcs11_sw) configured")
        token = slot.get_token()
        label = token.label.strip()
        initialised = bool(token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED)
        if initialised and label != OCK_LABEL:
            pytest.skip(
                f"openCryptoki's software token is initialised by someone else (label"
                f" {label!r}); the tests do not wipe it"
            )
        # a fresh token every run: C_InitToken erases every object (the SO PIN is the
        # factory one, never changed here)
        init = ctypes.CDLL(module).C_InitToken
        init.argtypes = (ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        init.restype = ctypes.c_ulong
        rv = init(slot.slot_id, OCK_SO_PIN.encode(), len(OCK_SO_PIN), OCK_LABEL.encode().ljust(32))
        if rv != 0:
            pytest.skip(f"openCryptoki refused C_InitToken (CKR 0x{rv:x})")
        with slot.get_token().open(rw=True, so_pin=OCK_SO_PIN) as session:
            session.init_pin(OCK_USER_PIN)
        yield SoftHsmToken(module, OCK_LABEL, OCK_USER_PIN)
    finally:
        if started is not None:
            _stop_after_exit(started)


def tokens_in(output: str) -> list[str]:
    return [word for word in output.split() if word.startswith("tf_")]


@dataclass
class Served:
    """A ``trustfleet serve`` process: its URL, data directory and admin token."""

    url: str
    data_dir: Path
    admin_token: str
    process: subprocess.Popen[bytes]
    log: Path


def init_data_dir(data_dir: Path) -> str:
    """``trustfleet init`` in ``data_dir``; the admin token it printed."""
    (token,) = tokens_in(run_cli(data_dir, "init").stdout)
    return token


@contextmanager
def served(
    data_dir: Path, *serve_args: str, admin_token: str = "", ca_file: Path | None = None
) -> Iterator[Served]:
    """``trustfleet serve`` on a free loopback port over ``data_dir`` (initialised if it is
    not), ready, stopped afterwards. With a ``--tls-...`` option the URL is https:// and
    readiness is checked against ``ca_file`` (default: the data directory's root CA)."""
    if not (data_dir / ".initialised").is_file():
        admin_token = init_data_dir(data_dir)
    port = free_port()
    tls = any(arg.startswith("--tls-") for arg in serve_args)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    log = data_dir.parent / f"serve-{port}.log"
    env = cli_environment(data_dir, TRUSTFLEET_LOG_LEVEL="WARNING")
    command = [sys.executable, "-m", "trustfleet.cli", "serve", "--port", str(port), *serve_args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    node = Node("serve", url, process, log)
    try:
        root = ca_file or data_dir / "ca" / "root.pem"
        verify = ssl.create_default_context(cafile=str(root)) if tls else True
        wait_ready(node, verify=verify)
        yield Served(url, data_dir, admin_token, process, log)
    finally:
        stop(node)
