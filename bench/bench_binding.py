"""SE binding: power-up verifications per second, next to the crypto they cannot avoid.

A power-up verification is on a device's boot path. For every mode and suite this measures,
in one run:

- in process: ``Host.power_up()`` against the applet in this process (power cycle, SELECT,
  challenge, response; both roles' Python and crypto), with the applet's NV in memory and,
  separately, in a file written atomically (fsync) as the emulator keeps it;
- over vpcd: the same power-up with the applet in another process behind the vpcd wire
  (loopback TCP, the host playing the reader), NV in memory;
- crypto-only: the same randoms, MACs, KDFs, signatures or encryptions both roles compute
  in one verification, called directly on the suite;
- codec floor: encoding and parsing the very C-APDUs and R-APDUs of one power-up (captured
  from a real one), both sides, with no logic: what any APDU-level Python host + applet
  pays before doing anything;
- the APDU exchanges one power-up takes (SELECT included).

ratio = crypto-only seconds / in-process seconds per verification (1.0 = no overhead), the
median of the paired rounds (seven by default; crypto and in process alternate, so load from
elsewhere on the machine hits both alike);
ceiling = crypto / (crypto + codec floor), the best ratio an APDU-level design allows.

In process, crypto-only and the codec floor are timed in this thread's CPU time by default
(``--clock cpu``): on a shared machine, time the thread spends descheduled is not the
verification's cost. The NV-file and vpcd figures are wall time (waiting for fsync or for
the card's process is their cost).

Usage: python bench/bench_binding.py [--seconds 1.0] [--rounds 7] [--clock cpu|wall]
       [--modes digest,mutual] [--suites p256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trustfleet.binding import protocol as p
from trustfleet.binding.host import Host, HostKey, HostStore
from trustfleet.binding.protocol import Mode
from trustfleet.binding.secure_element import SecureElement
from trustfleet.binding.storage import FileNvStore, MemoryNvStore, NvStore
from trustfleet.binding.transport import InProcessTransport, Transport, VpcdReader, serve_card
from trustfleet.wire.apdu import CommandApdu, ResponseApdu

ISSUER_KEY = bytes(32)
SE_ID = bytes(range(16))


@dataclass
class Row:
    suite: str
    mode: Mode
    apdus: int
    in_process: float  # seconds per verification
    in_process_file: float
    vpcd: float
    crypto: float
    codec: float
    #: median over paired rounds of crypto-only / in-process seconds
    ratio: float

    @property
    def ceiling(self) -> float:
        return self.crypto / (self.crypto + self.codec)


#: how a measurement reads time: "cpu" (this thread's CPU time) for what runs in this
#: thread only, so other tenants of a shared machine do not count; "wall" where waiting is
#: part of the cost (fsync, the vpcd round trips to the card's process)
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]
BATCH = 8  # calls between two clock readings (a CPU-time reading is a system call)


def per_call(
    fn: Callable[[], object],
    seconds: float,
    rounds: int = 5,
    clock: Callable[[], float] | None = None,
) -> float:
    """Median over ``rounds`` of the mean seconds per call in a ~seconds/rounds window."""
    read = clock or _clock
    fn()
    results = []
    for _ in range(rounds):
        n, start = 0, read()
        deadline = start + seconds / rounds
        while True:
            for _ in range(BATCH):
                fn()
            n += BATCH
            now = read()
            if now >= deadline:
                break
        results.append((now - start) / n)
    return statistics.median(results)


def _host(transport: Transport, directory: Path, mode: Mode, suite: str) -> Host:
    key = HostKey(bytes(32))
    store = HostStore(directory / f"{suite}-{mode}-{time.monotonic_ns()}.store", key)
    return Host(transport, store, device_id="bench-host", mode=mode, suite=suite)


def _se(nv: NvStore, suite: str) -> SecureElement:
    return SecureElement.manufacture(nv, issuer_key=ISSUER_KEY, issuer_suite=suite, se_id=SE_ID)


class _Recording(InProcessTransport):
    def __init__(self, se: SecureElement) -> None:
        super().__init__(se)
        self.exchanges: list[tuple[bytes, bytes]] = []

    def transmit(self, command: bytes) -> bytes:
        response = super().transmit(command)
        self.exchanges.append((command, response))
        return response


def in_process(
    mode: Mode, suite: str, nv: NvStore, directory: Path
) -> tuple[Callable[[], object], int, list[tuple[bytes, bytes]]]:
    """A bound host's ``power_up`` (to time), its APDU count and one power-up's APDUs."""
    transport = _Recording(_se(nv, suite))
    host = _host(transport, directory, mode, suite)
    host.power_up()  # binds
    transport.exchanges.clear()
    apdus = host.power_up().apdus
    exchanges = list(transport.exchanges)
    transport.transmit = super(_Recording, transport).transmit  # type: ignore[method-assign]
    return host.power_up, apdus, exchanges


def codec_floor(exchanges: list[tuple[bytes, bytes]], seconds: float) -> float:
    """Both sides' encode + parse of one power-up's APDUs, nothing else."""
    parsed = [(CommandApdu.parse(c), ResponseApdu.parse(r)) for c, r in exchanges]

    def work() -> None:
        for command, response in parsed:
            CommandApdu.parse(command.encode())  # host encodes, SE parses
            ResponseApdu.parse(ResponseApdu(response.data, response.sw).encode())

    return per_call(work, seconds)


def _card_process(port: int, suite: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    se = _se(MemoryNvStore(), suite)
    ready.set()
    serve_card(se, "127.0.0.1", port, stop=threading.Event())


def over_vpcd(mode: Mode, suite: str, directory: Path, seconds: float) -> float:
    reader = VpcdReader("127.0.0.1", 0, accept_timeout=30)
    ready = multiprocessing.Event()
    card = multiprocessing.Process(
        target=_card_process, args=(reader.port, suite, ready), daemon=True
    )
    card.start()
    try:
        ready.wait(30)
        host = _host(reader, directory, mode, suite)
        host.power_up()
        return per_call(host.power_up, seconds, clock=time.perf_counter)
    finally:
        reader.close()
        card.terminate()
        card.join(10)


def crypto_only(mode: Mode, suite: str) -> Callable[[], None]:
    """Both roles' cryptography for one verification, straight on the suite."""
    s = p.binding_suite(suite)
    rnd = os.urandom
    se_id = SE_ID
    if mode is Mode.DIGEST:
        r1 = rnd(32)

        def work() -> None:
            r2 = rnd(32)
            s.mac(r1, p.labelled("digest", se_id, r2))
            s.mac(r1, p.labelled("digest", se_id, r2))
    elif mode is Mode.CIPHER:
        r1 = rnd(16)

        def work() -> None:
            r2 = rnd(16)
            s.cmac(r1, p.labelled("cipher", se_id, r2))
            s.cmac(r1, p.labelled("cipher", se_id, r2))
    elif mode is Mode.ASYMMETRIC:
        key = p.generate_key(suite)
        public = key.public_key()
        info = p.labelled("asymmetric", se_id)

        def work() -> None:
            r = rnd(32)
            s.kem_unwrap(key, s.kem_wrap(public, r, info), info)
    elif mode is Mode.SIGNATURE:
        key = p.generate_key(suite)
        public = key.public_key()

        def work() -> None:
            message = p.labelled("signature", se_id, rnd(32))
            s.verify(public, message, s.sign(key, message))
    else:
        k_bind = rnd(32)

        def work() -> None:
            host_ch, se_ch = rnd(16), rnd(16)
            for _role in ("host", "se"):
                keys = p.session_keys(suite, k_bind, se_id, host_ch, se_ch)
                p.cryptogram(suite, keys, "card", se_id, host_ch, se_ch)
                p.cryptogram(suite, keys, "host", se_id, host_ch, se_ch)

    return work


PAIRED_ROUNDS = 7


def paired(
    a: Callable[[], object], b: Callable[[], object], seconds: float
) -> tuple[float, float, float]:
    """Alternate short windows of a and b; medians of each and of the per-round a/b."""
    rounds = PAIRED_ROUNDS
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(per_call(a, seconds / rounds / 2, rounds=1))
        tb.append(per_call(b, seconds / rounds / 2, rounds=1))
    ratio = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
    return statistics.median(ta), statistics.median(tb), ratio


def measure(mode: Mode, suite: str, seconds: float) -> Row:
    slow = suite == "gm" and mode in (Mode.ASYMMETRIC, Mode.SIGNATURE)
    budget = seconds * (4 if slow else 2)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        power_up, apdus, exchanges = in_process(mode, suite, MemoryNvStore(), directory)
        crypto, memory, ratio = paired(crypto_only(mode, suite), power_up, budget)
        on_file_power_up, _, _ = in_process(
            mode, suite, FileNvStore(directory / "se.nv"), directory
        )
        on_file = per_call(on_file_power_up, budget / 2, clock=time.perf_counter)
        vpcd = over_vpcd(mode, suite, directory, budget / 2)
        codec = codec_floor(exchanges, seconds / 2)
    return Row(suite, mode, apdus, memory, on_file, vpcd, crypto, codec, ratio)


def _rate(seconds: float) -> str:
    rate = 1 / seconds
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def main() -> None:
    global _clock, PAIRED_ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--modes", default=",".join(m.value for m in Mode))
    parser.add_argument("--suites", default="p256,gm")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="in process, crypto-only and codec floor in this thread's CPU time (default) or"
        " wall time; NV file and vpcd are always wall time",
    )
    parser.add_argument("--rounds", type=int, default=PAIRED_ROUNDS, help="paired rounds")
    args = parser.parse_args()
    _clock, PAIRED_ROUNDS = CLOCKS[args.clock], args.rounds
    print(
        "| suite | mode | APDUs/power-up | in process /s (NV in RAM) | in process /s (NV file)"
        " | over vpcd /s | crypto-only /s | crypto µs | codec floor µs | ratio | ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for suite in args.suites.split(","):
        for mode in (Mode(m) for m in args.modes.split(",")):
            row = measure(mode, suite, args.seconds)
            print(
                f"| {suite} | {mode.value} | {row.apdus} | {_rate(row.in_process)}"
                f" | {_rate(row.in_process_file)} | {_rate(row.vpcd)} | {_rate(row.crypto)}"
                f" | {row.crypto * 1e6:,.1f} | {row.codec * 1e6:,.1f} | {row.ratio:.2f}"
                f" | {row.ceiling:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
