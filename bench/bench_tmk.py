"""TMK download benchmark: full downloads by emulated POS terminals over HTTP on loopback.

For each terminal key suite (p256: P-256 TKP, rsa: RSA-2048 TKP) and each number of server
workers, a fresh data directory is initialised, terminals are made by the reference
terminal's factory step and imported, a real uvicorn server is started, and client
processes run one full download per terminal (request -> challenge -> proof -> delivery ->
confirmation, three HTTP round trips). Reported:

- downloads/s over the measured batch (clients share the 2 cores with the server, so this
  is a floor, not the server's limit);
- server CPU per download: CPU seconds of the server's whole process tree / downloads;
- crypto-only: the server-side cryptography of one download measured in the same run
  directly through pyca/cryptography (sign the challenge with the work key, verify the
  terminal's proof, generate the TMK, wrap it to TKP_Pu, its KCV, check the confirmation
  CMAC), and the ratio crypto-only / server CPU (1.0 would mean no overhead at all).

With ``--keystores soft pkcs11`` each measurement runs once per key store: the soft store
(master key file) and the PKCS#11 backend on a SoftHSM2 token made for the run (signing
keys in the token, TMKs and ticket keys sealed under it); the crypto-only figure is then
the same operations done where that store does them (see :func:`crypto_only_seconds`).

Usage: python bench/bench_tmk.py [--terminals 300] [--suites p256 rsa] [--workers 1 2]
                                 [--concurrency 16] [--database-url URL]
                                 [--keystores soft pkcs11]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import cmac, hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from sqlalchemy import text

from trustfleet.bootstrap import initialise
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.server.auth import create_token
from trustfleet.server.runner import build_context
from trustfleet.settings import load_settings
from trustfleet.store.engine import make_engine
from trustfleet.tmk import registry, services
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

SUITES = {"p256": KeyAlgorithm.EC_P256, "rsa": KeyAlgorithm.RSA_2048}
KEYSTORES = ("soft", "pkcs11")
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL, TOKEN_PIN = "bench", "1234"


@dataclass(frozen=True)
class Token:
    """The SoftHSM2 token of a run (one per process: SoftHSM2 reads its configuration once)."""

    conf: Path
    module: str = SOFTHSM_MODULE
    label: str = TOKEN_LABEL
    pin: str = TOKEN_PIN

    def environment(self) -> dict[str, str]:
        return {
            "SOFTHSM2_CONF": str(self.conf),
            "TRUSTFLEET_KEYSTORE_BACKEND": "pkcs11",
            "TRUSTFLEET_PKCS11_MODULE": self.module,
            "TRUSTFLEET_PKCS11_TOKEN_LABEL": self.label,
            "TRUSTFLEET_PKCS11_USER_PIN": self.pin,
        }


_TOKEN: list[Token] = []


def softhsm_token() -> Token:
    """A SoftHSM2 token in a temporary directory, made once per process; SOFTHSM2_CONF names
    it from then on."""
    if not _TOKEN:
        root = Path(tempfile.mkdtemp(prefix="tf-bench-softhsm-"))
        (root / "tokens").mkdir()
        conf = root / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin",
             TOKEN_PIN, "--so-pin", "5678"],
            check=True, capture_output=True,
        )  # fmt: skip
        _TOKEN.append(Token(conf))
    return _TOKEN[0]


CLIENT_PROCESSES = 2
WARMUP_TERMINALS = 8
CONCURRENCY = 16


@dataclass(frozen=True)
class Fleet:
    data_dir: Path
    terminal_dirs: list[Path]
    gateway_token: str
    env: dict[str, str]


@dataclass(frozen=True)
class Measurement:
    suite: str
    keystore: str
    workers: int
    downloads: int
    failures: int
    seconds: float
    server_cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.downloads / self.seconds

    @property
    def cpu_ms_per_download(self) -> float:
        return 1000 * self.server_cpu_seconds / self.downloads


# -- setup -------------------------------------------------------------------------------


def _make_terminal(args: tuple[str, str, str, bytes]) -> tuple[str, dict[str, Any]]:
    directory, sn, algorithm, root_pem = args
    record = PosTerminal.factory(directory, sn, KeyAlgorithm(algorithm), root_pem=root_pem)
    return directory, record.to_dict()


def fresh_schema_url(database_url: str) -> str:
    """A new, empty schema of the PostgreSQL database (each run starts from nothing)."""
    schema = "bench_" + secrets.token_hex(6)
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    sep = "&" if "?" in database_url else "?"
    return f"{database_url}{sep}options=-csearch_path%3D{schema}"


def build_fleet(
    workdir: Path, suite: str, count: int, database_url: str, keystore: str = "soft"
) -> Fleet:
    if database_url:
        database_url = fresh_schema_url(database_url)
    data_dir = workdir / "data"
    env = {**os.environ, "TRUSTFLEET_DATA_DIR": str(data_dir), "TRUSTFLEET_LOG_LEVEL": "WARNING"}
    if database_url:
        env["TRUSTFLEET_DATABASE_URL"] = database_url
    overrides: dict[str, Any] = {}
    if keystore == "pkcs11":
        token = softhsm_token()
        env.update(token.environment())
        overrides = {
            "keystore_backend": "pkcs11",
            "pkcs11_module": token.module,
            "pkcs11_token_label": token.label,
            "pkcs11_user_pin": token.pin,
        }
    settings = load_settings(data_dir, database_url=database_url or None, **overrides)
    initialise(settings)
    context = build_context(settings)
    identity = services.identity(context)
    identity.ensure(actor="bench")
    root_pem = identity.root().pem.encode()
    jobs = [
        (str(workdir / "terminals" / f"T{i:06d}"), f"BENCH{i:06d}", SUITES[suite].value, root_pem)
        for i in range(count)
    ]
    with multiprocessing.Pool(CLIENT_PROCESSES) as pool:
        made = pool.map(_make_terminal, jobs, chunksize=16)
    rows = (
        registry.RawRecord(n, rec["sn"], rec["model"], rec["public_key"])
        for n, (_, rec) in enumerate(made, start=1)
    )
    report = registry.import_terminals(context.db, rows, actor="bench")
    assert report.accepted == count, report.to_dict()["rejected"][:3]
    token, _ = create_token(context.db, "bench gateway", "device-gateway", actor="bench")
    close = getattr(context.keystore, "close", None)
    if close is not None:
        close()
    context.engine.dispose()
    return Fleet(data_dir, [Path(d) for d, _ in made], token, env)


# -- the server and its CPU time ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants."""
    ticks = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            fields = (Path("/proc") / str(member) / "stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def uvicorn_server(
    app: list[str], env: dict[str, str], workers: int = 1
) -> Iterator[tuple[str, int]]:
    """uvicorn serving ``app`` (its uvicorn arguments) on a free loopback port, once it
    answers ``GET /readyz``: its URL and process id."""
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", *app, "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the server did not become ready")
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


#: a node as deployments start it with uvicorn's command line (docs/configuration.md)
NODE_APP = [
    "--factory", "trustfleet.server.runner:app_from_env",
    "--http", "trustfleet.server.protocol:HttpProtocol",
]  # fmt: skip


def running_server(
    fleet: Fleet, workers: int
) -> contextlib.AbstractContextManager[tuple[str, int]]:
    return uvicorn_server(NODE_APP, fleet.env, workers)


# -- clients -----------------------------------------------------------------------------


def _client_process(url: str, token: str, directories: list[str], threads: int) -> int:
    """Download with ``threads`` threads over the given terminals; return the failures."""
    failures = 0
    lock = threading.Lock()
    queue = list(directories)

    def worker() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=30) as client:
            transport = HttpTransport(client, token)
            while True:
                with lock:
                    if not queue:
                        return
                    directory = queue.pop()
                try:
                    PosTerminal.open(directory).download(transport)
                except Exception as exc:  # counted and reported, never hidden
                    with lock:
                        failures += 1
                        if failures <= 3:
                            print(f"  download failed: {exc!r}", file=sys.stderr)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return failures


def run_downloads(url: str, token: str, directories: list[Path], concurrency: int) -> int:
    shares = [[str(d) for d in directories[i::CLIENT_PROCESSES]] for i in range(CLIENT_PROCESSES)]
    threads = max(1, concurrency // CLIENT_PROCESSES)
    with multiprocessing.Pool(CLIENT_PROCESSES) as pool:
        results = [
            pool.apply_async(_client_process, (url, token, share, threads)) for share in shares
        ]
        return sum(r.get() for r in results)


def measure(
    suite: str,
    workers: int,
    *,
    terminals: int,
    concurrency: int = CONCURRENCY,
    database_url: str = "",
    keystore: str = "soft",
) -> Measurement:
    workdir = Path(tempfile.mkdtemp(prefix=f"tf-bench-tmk-{suite}-"))
    try:
        fleet = build_fleet(workdir, suite, terminals + WARMUP_TERMINALS, database_url, keystore)
        warmup, measured = (
            fleet.terminal_dirs[:WARMUP_TERMINALS],
            fleet.terminal_dirs[WARMUP_TERMINALS:],
        )
        with running_server(fleet, workers) as (url, pid):
            run_downloads(url, fleet.gateway_token, warmup, WARMUP_TERMINALS)
            cpu_before, start = tree_cpu_seconds(pid), time.perf_counter()
            failures = run_downloads(url, fleet.gateway_token, measured, concurrency)
            seconds, cpu = time.perf_counter() - start, tree_cpu_seconds(pid) - cpu_before
        downloads = len(measured) - failures
        return Measurement(suite, keystore, workers, downloads, failures, seconds, cpu)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- the crypto-only limit ---------------------------------------------------------------


def _per_op(operation: Callable[[], object], seconds: float = 0.5) -> float:
    """CPU seconds per call of ``operation`` (process time: SoftHSM2 runs in this process)."""
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            operation()
        count += 20
    return (time.process_time() - cpu) / count


def crypto_only_seconds(suite: str) -> float:
    """Server-side cryptography of one download, directly through pyca/cryptography."""
    work_key = ec.generate_private_key(ec.SECP256R1())
    tbs = secrets.token_bytes(180)
    tmk = secrets.token_bytes(16)
    cmac_data = secrets.token_bytes(48)

    def aes_cmac(data: bytes) -> bytes:
        mac = cmac.CMAC(algorithms.AES(tmk))
        mac.update(data)
        return mac.finalize()

    ops: list[Callable[[], object]] = [
        lambda: work_key.sign(tbs, ec.ECDSA(hashes.SHA256())),  # challenge signature
        lambda: secrets.token_bytes(16),  # the TMK
        lambda: aes_cmac(bytes(16)),  # its KCV
        lambda: aes_cmac(cmac_data),  # checking the confirmation
    ]
    if suite == "p256":
        tkp = ec.generate_private_key(ec.SECP256R1())
        proof = tkp.sign(tbs, ec.ECDSA(hashes.SHA256()))
        kem = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
        public = tkp.public_key()
        ops.append(lambda: public.verify(proof, tbs, ec.ECDSA(hashes.SHA256())))
        ops.append(lambda: kem.encrypt(tmk, public, b"transcript-hash-32-bytes........"))
    else:
        tkp_rsa = rsa.generate_private_key(65537, 2048)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        proof = tkp_rsa.sign(tbs, pss, hashes.SHA256())
        oaep = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"t" * 32
        )
        rsa_public = tkp_rsa.public_key()
        ops.append(lambda: rsa_public.verify(proof, tbs, pss, hashes.SHA256()))
        ops.append(lambda: rsa_public.encrypt(tmk, oaep))
    return sum(_per_op(op) for op in ops)


def crypto_only_pkcs11_seconds(suite: str) -> float:
    """The same cryptography of one download done where the PKCS#11 key store does it on
    SoftHSM2, directly through python-pkcs11 and pyca: the challenge signed by the work key
    inside the token; the TMK generated inside the token and sealed there (C_WrapKey under
    the KEK, HMAC tag); for its transport the tag checked and the TMK unwrapped into process
    memory (HPKE and RSA-OAEP-SHA256 with a label have no mechanism SoftHSM2 takes) and
    wrapped by pyca; its KCV and the confirmation's CMAC in the token; the session object
    destroyed. The terminal's proof is verified by pyca, as in the soft store."""
    import hashlib

    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    token = softhsm_token()
    found = pkcs11.lib(token.module).get_token(token_label=token.label)
    try:
        session = found.open(rw=True, user_pin=token.pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # a key store of this process logged in
        session = found.open(rw=True)
    try:
        from pkcs11.util.ec import encode_named_curve_parameters

        params = encode_named_curve_parameters("1.2.840.10045.3.1.7")
        _, work_key = session.generate_keypair(
            KeyType.EC,
            None,
            store=False,
            public_template={Attribute.EC_PARAMS: params},
        )
        kek = session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.UNWRAP: True}
        )
        tag_key = session.generate_key(
            KeyType.GENERIC_SECRET, 256, store=False, template={Attribute.SIGN: True}
        )
        tbs = secrets.token_bytes(180)
        binding = secrets.token_bytes(90)
        cmac_data = secrets.token_bytes(48)
        if suite == "p256":
            tkp = ec.generate_private_key(ec.SECP256R1())
            proof = tkp.sign(tbs, ec.ECDSA(hashes.SHA256()))
            kem = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
            public = tkp.public_key()

            def verify() -> None:
                public.verify(proof, tbs, ec.ECDSA(hashes.SHA256()))

            def transport(value: bytes) -> bytes:
                return kem.encrypt(value, public, b"transcript-hash-32-bytes........")
        else:
            tkp_rsa = rsa.generate_private_key(65537, 2048)
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            rsa_proof = tkp_rsa.sign(tbs, pss, hashes.SHA256())
            oaep = padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"t" * 32
            )
            rsa_public = tkp_rsa.public_key()

            def verify() -> None:
                rsa_public.verify(rsa_proof, tbs, pss, hashes.SHA256())

            def transport(value: bytes) -> bytes:
                return rsa_public.encrypt(value, oaep)

        def download() -> None:
            work_key.sign(hashlib.sha256(tbs).digest(), mechanism=Mechanism.ECDSA)
            verify()
            tmk = session.generate_key(
                KeyType.AES,
                128,
                store=False,
                template={Attribute.EXTRACTABLE: True, Attribute.SIGN: True},
            )
            wrapped = kek.wrap_key(tmk, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            tag_key.sign(binding + wrapped, mechanism=Mechanism.SHA256_HMAC)  # sealing
            tag_key.sign(binding + wrapped, mechanism=Mechanism.SHA256_HMAC)  # its check
            clear = kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                wrapped,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            )
            transport(bytes(clear[Attribute.VALUE]))
            clear.destroy()
            tmk.sign(bytes(16), mechanism=Mechanism.AES_CMAC)  # its KCV
            tmk.sign(cmac_data, mechanism=Mechanism.AES_CMAC)  # checking the confirmation
            tmk.destroy()

        return _per_op(download, seconds=1.0)
    finally:
        session.close()


# -- report ------------------------------------------------------------------------------


def crypto_seconds(suite: str, keystore: str) -> float:
    if keystore == "pkcs11":
        return crypto_only_pkcs11_seconds(suite)
    return crypto_only_seconds(suite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terminals", type=int, default=300)
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--database-url", default="", help="default: SQLite in the data dir")
    parser.add_argument("--keystores", nargs="+", default=["soft"], choices=KEYSTORES)
    args = parser.parse_args()

    print(f"{args.terminals} downloads per run, {args.concurrency} concurrent terminals, "
          f"database {'PostgreSQL' if args.database_url else 'SQLite'}")  # fmt: skip
    print(
        "| suite | key store | workers | downloads/s | server CPU ms/download"
        " | crypto-only ms | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for suite in args.suites:
        for keystore in args.keystores:
            crypto_ms = 1000 * crypto_seconds(suite, keystore)
            for workers in args.workers:
                m = measure(
                    suite,
                    workers,
                    terminals=args.terminals,
                    concurrency=args.concurrency,
                    database_url=args.database_url,
                    keystore=keystore,
                )
                ratio = crypto_ms / m.cpu_ms_per_download
                failed = f" ({m.failures} failed)" if m.failures else ""
                print(
                    f"| {suite} | {keystore} | {workers} | {m.per_second:,.0f}{failed}"
                    f" | {m.cpu_ms_per_download:.2f} | {crypto_ms:.3f} | {ratio:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
