"""TMK downloads counted in CPU instructions: deterministic, where wall-clock figures on a
shared VM move ±20% between runs.

Downloads are driven through the ASGI app in process (no HTTP, the emulated terminal in the
same process) under ``valgrind --tool=callgrind``: the instructions of a run of ``--long``
downloads minus a run of ``--short``, divided by the difference, is what one download costs
the whole process (terminal and server), start-up and warm-up cancelled out. Only public
HTTP routes are used, so the same script measures any version of the code (A/B).

Usage: python bench/bench_tmk_instructions.py [--short 20] [--long 60]
       python bench/bench_tmk_instructions.py --run N    (what valgrind runs)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():  # starlette's notice about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

WARMUP = 5


def run_downloads(count: int, made: int, workdir: Path) -> None:
    """``WARMUP`` + ``made`` P-256 terminals made and imported, then ``WARMUP`` + ``count``
    full downloads, on a fresh SQLite server. Both runs of a measurement make as many
    terminals, so only the downloads differ."""
    from trustfleet.bootstrap import initialise
    from trustfleet.server.app import create_app
    from trustfleet.server.runner import build_context
    from trustfleet.settings import load_settings
    from trustfleet.tmk.terminal import HttpTransport, PosTerminal

    settings = load_settings(workdir / "data")
    admin = initialise(settings).admin_token
    with TestClient(create_app(build_context(settings))) as client:

        def call(method: str, path: str, token: str, **kwargs: object) -> dict[str, str]:
            headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
            response = client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
            response.raise_for_status()
            return response.json()  # type: ignore[no-any-return]

        def token(role: str) -> str:
            return call("POST", "/v1/tokens", admin, json={"name": role, "role": role})["token"]

        root = call("POST", "/v1/tmk/identity", admin)["ksrcrt_pem"].encode()
        maker, gateway = token("manufacturer"), token("device-gateway")
        terminals = []
        for n in range(WARMUP + made):
            directory = workdir / f"t{n}"
            PosTerminal.factory(directory, f"CG{n:06d}", root_pem=root)
            call(
                "POST",
                "/v1/tmk/terminals/import",
                maker,
                content=(directory / "record.ndjson").read_bytes(),
                headers={"Content-Type": "application/x-ndjson"},
            )
            terminals.append(PosTerminal.open(directory))
        transport = HttpTransport(client, gateway)
        for terminal in terminals[: WARMUP + count]:
            terminal.download(transport)


def instructions(count: int, made: int) -> int:
    """Total instructions of a process that runs ``count`` downloads (under callgrind)."""
    with tempfile.TemporaryDirectory(prefix="tf-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--run",
            str(count),
            "--make",
            str(made),
        ]
        subprocess.run(command, check=True, capture_output=True)
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert summary is not None, "callgrind wrote no summary line"
        return int(summary.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        workdir = Path(tempfile.mkdtemp(prefix="tf-cg-"))
        try:
            run_downloads(args.run, args.make or args.run, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian package valgrind)")
    short, long = instructions(args.short, args.long), instructions(args.long, args.long)
    per_download = (long - short) / (args.long - args.short)
    print(f"p256, SQLite, in process: {per_download / 1e6:.2f} M instructions per download")
    print(f"(runs of {args.short} and {args.long} downloads: {short:,} and {long:,})")


if __name__ == "__main__":
    main()
