"""Throughput of each crypto suite through trustfleet, against the same primitive called
directly (pyca/cryptography; gmalglib for SM2) in the same run.

    python bench/bench_crypto.py [--seconds N] [--suite NAME ...] [--floor-rounds N]

``--seconds`` is the time budget of each (suite, operation) pair, split evenly between
the two sides. The sides run in alternating short batches (trustfleet first in even
rounds, direct first in odd ones) so that frequency scaling and other load hit both
alike; the rates are medians over rounds, and the ratio trustfleet/direct is the median
of the per-round ratios. It is the cost of the suite layer; the target is >= 0.9 for
every public-key operation.

The direct side gets the same inputs as the suite API: raw key bytes for the symmetric
operations (so both sides build the cipher object per call) and key objects for the
public-key ones (the direct side prebuilds its padding/algorithm objects once).

With the gm suite, SM2 signing and verification are also measured against OpenSSL's own
SM2 (``openssl speed -mr -seconds S sm2``, S = ``--seconds`` rounded, at least 1) as the
floor: ``--floor-rounds`` rounds, each one openssl speed run and S seconds of each gm
operation (in alternating order), on the same 20-byte message openssl speed signs; the
ratio is the median of the per-round ratios. The target is >= 0.3 (issue 18).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import cryptography
from cryptography.hazmat.primitives import cmac, hashes, hmac, hpke
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from gmalglib.sm2 import SM2 as GmalglibSM2

from trustfleet.crypto import SM2PrivateKey, get_suite
from trustfleet.crypto.base import Suite

Op = Callable[[], object]
ROUNDS = 30
INFO = b"bench session"
SMALL = os.urandom(64)
LARGE = os.urandom(1 << 20)
AAD = b"header"
PUBLIC_KEY_OPS = ("sign", "verify", "kem wrap", "kem unwrap")
FLOOR_TARGET = 0.3
#: the message openssl speed signs and verifies for SM2 (a 20-byte buffer)
FLOOR_MESSAGE = os.urandom(20)


@dataclass(frozen=True)
class Case:
    suite: str
    op: str
    ours: Op
    direct: Op


@dataclass(frozen=True)
class Result:
    case: Case
    ours: float
    direct: float
    #: median over rounds of the ratio of the two adjacent batches of a round
    ratio: float

    @property
    def public_key(self) -> bool:
        return self.case.op in PUBLIC_KEY_OPS


# -- measuring -------------------------------------------------------------------------


def _batch_rate(fn: Op, count: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    elapsed = time.perf_counter() - start
    return count / elapsed, elapsed


def _batch_size(fn: Op, seconds: float) -> int:
    """Calls that take about ``seconds`` (after one warm-up call)."""
    fn()
    count = 1
    while True:
        _, elapsed = _batch_rate(fn, count)
        if elapsed >= seconds / 4 or count >= 1 << 20:
            return max(1, round(count * seconds / max(elapsed, 1e-9)))
        count *= 4


def measure(case: Case, seconds: float) -> Result:
    """Alternate short batches of both sides; pairing the two batches of each round
    cancels most of the drift that other processes on the machine cause."""
    per_batch = seconds / (2 * ROUNDS)
    ours_count = _batch_size(case.ours, per_batch)
    direct_count = _batch_size(case.direct, per_batch)
    ours: list[float] = []
    direct: list[float] = []
    for round_number in range(ROUNDS):
        if round_number % 2 == 0:
            ours.append(_batch_rate(case.ours, ours_count)[0])
            direct.append(_batch_rate(case.direct, direct_count)[0])
        else:
            direct.append(_batch_rate(case.direct, direct_count)[0])
            ours.append(_batch_rate(case.ours, ours_count)[0])
    ratios = [o / d for o, d in zip(ours, direct, strict=True)]
    return Result(
        case, statistics.median(ours), statistics.median(direct), statistics.median(ratios)
    )


# -- the cases -------------------------------------------------------------------------


def _symmetric_cases(suite: Suite, seal: Callable[[bytes, bytes, bytes, bytes], bytes],
                     open_: Callable[[bytes, bytes, bytes, bytes], bytes],
                     mac: Callable[[bytes, bytes], bytes],
                     block_mac: Callable[[bytes, bytes], bytes]) -> list[Case]:  # fmt: skip
    key = os.urandom(suite.aead_key_size)
    nonce = os.urandom(suite.aead_nonce_size)
    mac_key, cmac_key = os.urandom(32), os.urandom(16)
    cases = []
    for label, data in (("64 B", SMALL), ("1 MiB", LARGE)):
        sealed = suite.aead_seal(key, nonce, data, AAD)
        cases += [
            Case(suite.name, f"aead seal {label}",
                 lambda d=data: suite.aead_seal(key, nonce, d, AAD),
                 lambda d=data: seal(key, nonce, d, AAD)),
            Case(suite.name, f"aead open {label}",
                 lambda s=sealed: suite.aead_open(key, nonce, s, AAD),
                 lambda s=sealed: open_(key, nonce, s, AAD)),
        ]  # fmt: skip
    cases += [
        Case(suite.name, "hmac 64 B", lambda: suite.mac(mac_key, SMALL),
             lambda: mac(mac_key, SMALL)),
        Case(suite.name, "cmac 64 B", lambda: suite.cmac(cmac_key, SMALL),
             lambda: block_mac(cmac_key, SMALL)),
    ]  # fmt: skip
    return cases


def _hmac(algorithm: hashes.HashAlgorithm) -> Callable[[bytes, bytes], bytes]:
    def run(key: bytes, data: bytes) -> bytes:
        mac = hmac.HMAC(key, algorithm)
        mac.update(data)
        return mac.finalize()

    return run


def _cmac(
    cipher: Callable[[bytes], algorithms.AES | algorithms.SM4],
) -> Callable[[bytes, bytes], bytes]:
    def run(key: bytes, data: bytes) -> bytes:
        mac = cmac.CMAC(cipher(key))
        mac.update(data)
        return mac.finalize()

    return run


def _aead(
    cls: type[AESGCM] | type[ChaCha20Poly1305],
) -> tuple[
    Callable[[bytes, bytes, bytes, bytes], bytes], Callable[[bytes, bytes, bytes, bytes], bytes]
]:
    def seal(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return cls(key).encrypt(nonce, data, aad)

    def open_(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return cls(key).decrypt(nonce, data, aad)

    return seal, open_


def _sm4_gcm_seal(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    return encryptor.update(data) + encryptor.finalize() + encryptor.tag


def _sm4_gcm_open(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, data[-16:])).decryptor()
    decryptor.authenticate_additional_data(aad)
    return decryptor.update(data[:-16]) + decryptor.finalize()


def _hpke_cases(suite: Suite, hpke_suite: hpke.Suite) -> list[Case]:
    kem = suite.generate_kem_key()
    assert isinstance(kem, ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey)
    public = kem.public_key()
    wrapped = suite.kem_wrap(public, SMALL[:32], INFO)
    return [
        Case(suite.name, "kem wrap", lambda: suite.kem_wrap(public, SMALL[:32], INFO),
             lambda: hpke_suite.encrypt(SMALL[:32], public, info=INFO)),
        Case(suite.name, "kem unwrap", lambda: suite.kem_unwrap(kem, wrapped, INFO),
             lambda: hpke_suite.decrypt(wrapped, kem, info=INFO)),
    ]  # fmt: skip


def p256_cases() -> list[Case]:
    suite = get_suite("p256")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ecdsa = ec.ECDSA(hashes.SHA256())
    signature = suite.sign(key, SMALL)
    hpke_suite = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    return [
        Case("p256", "sign", lambda: suite.sign(key, SMALL), lambda: key.sign(SMALL, ecdsa)),
        Case("p256", "verify", lambda: suite.verify(public, SMALL, signature),
             lambda: public.verify(signature, SMALL, ecdsa)),
        *_hpke_cases(suite, hpke_suite),
        *_symmetric_cases(suite, *_aead(AESGCM), _hmac(hashes.SHA256()), _cmac(algorithms.AES)),
    ]  # fmt: skip


def ed25519_cases() -> list[Case]:
    suite = get_suite("ed25519")
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key()
    signature = suite.sign(key, SMALL)
    hpke_suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    return [
        Case("ed25519", "sign", lambda: suite.sign(key, SMALL), lambda: key.sign(SMALL)),
        Case("ed25519", "verify", lambda: suite.verify(public, SMALL, signature),
             lambda: public.verify(signature, SMALL)),
        *_hpke_cases(suite, hpke_suite),
        *_symmetric_cases(suite, *_aead(ChaCha20Poly1305), _hmac(hashes.SHA256()),
                          _cmac(algorithms.AES)),
    ]  # fmt: skip


def rsa_cases() -> list[Case]:
    suite = get_suite("rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public = key.public_key()
    mgf = padding.MGF1(hashes.SHA256())
    pss = padding.PSS(mgf=mgf, salt_length=padding.PSS.DIGEST_LENGTH)
    oaep = padding.OAEP(mgf=mgf, algorithm=hashes.SHA256(), label=INFO)
    sha256 = hashes.SHA256()
    signature = suite.sign(key, SMALL)
    wrapped = suite.kem_wrap(public, SMALL[:32], INFO)
    return [
        Case("rsa", "sign", lambda: suite.sign(key, SMALL), lambda: key.sign(SMALL, pss, sha256)),
        Case("rsa", "verify", lambda: suite.verify(public, SMALL, signature),
             lambda: public.verify(signature, SMALL, pss, sha256)),
        Case("rsa", "kem wrap", lambda: suite.kem_wrap(public, SMALL[:32], INFO),
             lambda: public.encrypt(SMALL[:32], oaep)),
        Case("rsa", "kem unwrap", lambda: suite.kem_unwrap(key, wrapped, INFO),
             lambda: key.decrypt(wrapped, oaep)),
        *_symmetric_cases(suite, *_aead(AESGCM), _hmac(hashes.SHA256()), _cmac(algorithms.AES)),
    ]  # fmt: skip


def gm_cases() -> list[Case]:
    suite = get_suite("gm")
    key = SM2PrivateKey.generate()
    public = key.public_key()
    uid = key.uid
    raw = GmalglibSM2(key.private_bytes(), uid=uid)
    raw_public = GmalglibSM2(pk=public.public_bytes(), uid=uid)
    signature = suite.sign(key, SMALL)
    raw_signature = raw.sign(SMALL)  # r || s, 64 bytes
    wrapped = suite.kem_wrap(public, SMALL[:32], INFO)
    nonce = bytes(12)

    def gmalglib_kem_wrap() -> bytes:
        content_key = os.urandom(16)
        wrapped_key = raw_public.encrypt(content_key)
        return wrapped_key + _sm4_gcm_seal(content_key, nonce, SMALL[:32], INFO)

    def gmalglib_kem_unwrap() -> bytes:
        content_key = raw.decrypt(wrapped[:113])
        return _sm4_gcm_open(content_key, nonce, wrapped[113:], INFO)

    return [
        Case("gm", "sign", lambda: suite.sign(key, SMALL), lambda: raw.sign(SMALL)),
        Case("gm", "verify", lambda: suite.verify(public, SMALL, signature),
             lambda: raw_public.verify(SMALL, raw_signature)),
        Case("gm", "kem wrap", lambda: suite.kem_wrap(public, SMALL[:32], INFO),
             gmalglib_kem_wrap),
        Case("gm", "kem unwrap", lambda: suite.kem_unwrap(key, wrapped, INFO),
             gmalglib_kem_unwrap),
        *_symmetric_cases(suite, _sm4_gcm_seal, _sm4_gcm_open, _hmac(hashes.SM3()),
                          _cmac(algorithms.SM4)),
    ]  # fmt: skip


CASES: dict[str, Callable[[], list[Case]]] = {
    "p256": p256_cases,
    "ed25519": ed25519_cases,
    "rsa": rsa_cases,
    "gm": gm_cases,
}


# -- the floor: OpenSSL's own SM2 ------------------------------------------------------

#: ``+F7:<index>:<bits>:<curve>:<sign/s>:<verify/s>`` in openssl speed's -mr output
_SPEED_SM2 = re.compile(rb"^\+F7:\d+:256:CurveSM2:([0-9.]+):([0-9.]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class FloorResult:
    op: str
    ours: float
    openssl: float
    #: median over rounds of trustfleet ÷ openssl within the round
    ratio: float


def openssl_speed_sm2(binary: str, seconds: int) -> tuple[float, float]:
    """Signatures and verifications per second of OpenSSL's SM2, in one openssl run."""
    result = subprocess.run([binary, "speed", "-mr", "-seconds", str(seconds), "sm2"],
                            capture_output=True, check=True, timeout=60 + 4 * seconds)  # fmt: skip
    match = _SPEED_SM2.search(result.stdout)
    if match is None:
        raise RuntimeError("openssl speed printed no SM2 result")
    return float(match.group(1)), float(match.group(2))


def measure_sm2_floor(binary: str, seconds: int, rounds: int) -> list[FloorResult]:
    suite = get_suite("gm")
    key = SM2PrivateKey.generate()
    public = key.public_key()
    signature = suite.sign(key, FLOOR_MESSAGE)
    ops: dict[str, Op] = {
        "sign": lambda: suite.sign(key, FLOOR_MESSAGE),
        "verify": lambda: suite.verify(public, FLOOR_MESSAGE, signature),
    }
    counts = {op: _batch_size(fn, seconds) for op, fn in ops.items()}
    ours: dict[str, list[float]] = {op: [] for op in ops}
    theirs: dict[str, list[float]] = {op: [] for op in ops}

    def run_ours() -> None:
        for op, fn in ops.items():
            ours[op].append(_batch_rate(fn, counts[op])[0])

    def run_openssl() -> None:
        sign, verify = openssl_speed_sm2(binary, seconds)
        theirs["sign"].append(sign)
        theirs["verify"].append(verify)

    for round_number in range(rounds):
        first, second = (run_ours, run_openssl) if round_number % 2 == 0 else (
            run_openssl, run_ours)  # fmt: skip
        first()
        second()
    return [
        FloorResult(
            f"gm {op}",
            statistics.median(ours[op]),
            statistics.median(theirs[op]),
            statistics.median(o / t for o, t in zip(ours[op], theirs[op], strict=True)),
        )
        for op in ops
    ]


def openssl_with_sm2() -> str | None:
    """The openssl tool if it is there and has SM2 signatures."""
    binary = shutil.which("openssl")
    if binary is None:
        return None
    listed = subprocess.run([binary, "list", "-signature-algorithms"], capture_output=True,
                            timeout=30)  # fmt: skip
    return binary if listed.returncode == 0 and b"SM2" in listed.stdout else None


# -- report ----------------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(results: list[Result]) -> str:
    lines = [
        "| suite | operation | trustfleet ops/s | direct ops/s | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        mark = " ⚠" if r.public_key and r.ratio < 0.9 else ""
        lines.append(
            f"| {r.case.suite} | {r.case.op} | {_rate(r.ours)} | {_rate(r.direct)} "
            f"| {r.ratio:.2f}{mark} |"
        )
    return "\n".join(lines)


def floor_table(results: list[FloorResult]) -> str:
    lines = [
        "| operation | trustfleet ops/s | openssl speed ops/s | ratio | target |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " ⚠" if r.ratio < FLOOR_TARGET else ""
        lines.append(
            f"| {r.op} | {_rate(r.ours)} | {_rate(r.openssl)} | {r.ratio:.2f}{mark} "
            f"| >= {FLOOR_TARGET} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="time budget per (suite, operation) pair (default 1.0)",
    )
    parser.add_argument("--suite", action="append", choices=sorted(CASES),
                        help="only these suites (repeatable)")  # fmt: skip
    parser.add_argument("--floor-rounds", type=int, default=5,
                        help="rounds against openssl speed sm2 with the gm suite "
                             "(default 5; 0 skips the floor)")  # fmt: skip
    args = parser.parse_args(argv)
    suites = args.suite or list(CASES)

    started = time.perf_counter()
    results: list[Result] = []
    for name in suites:
        for case in CASES[name]():
            results.append(measure(case, args.seconds))
            print(f"  {case.suite:8} {case.op:16} done", file=sys.stderr, flush=True)

    floor: list[FloorResult] = []
    floor_note = ""
    if "gm" in suites and args.floor_rounds > 0:
        binary = openssl_with_sm2()
        if binary is None:
            floor_note = "no openssl tool with SM2 here: the OpenSSL floor was not measured"
        else:
            speed_seconds = max(1, round(args.seconds))
            floor = measure_sm2_floor(binary, speed_seconds, args.floor_rounds)
            version = subprocess.run([binary, "version"], capture_output=True, text=True)
            floor_note = (f"`openssl speed -mr -seconds {speed_seconds} sm2` "
                          f"({version.stdout.split(' (Library')[0].strip()}), "
                          f"{args.floor_rounds} rounds")  # fmt: skip
            print("  gm       openssl floor    done", file=sys.stderr, flush=True)

    print(f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
          f"gmalglib {metadata.version('gmalglib')}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s total\n")  # fmt: skip
    print(table(results))
    status = 0
    slow = [r for r in results if r.public_key and r.ratio < 0.9]
    print()
    if slow:
        print("public-key operations under the 0.9 target: "
              + ", ".join(f"{r.case.suite} {r.case.op} ({r.ratio:.2f})" for r in slow))  # fmt: skip
        status = 1
    else:
        print("every public-key operation is within the 0.9 target")

    if floor_note:
        print(f"\nSM2 against OpenSSL's own: {floor_note}\n")
    if floor:
        print(floor_table(floor))
        under = [r for r in floor if r.ratio < FLOOR_TARGET]
        print()
        if under:
            print(f"under the {FLOOR_TARGET} floor target: "
                  + ", ".join(f"{r.op} ({r.ratio:.2f})" for r in under))  # fmt: skip
            status = 1
        else:
            print(f"SM2 sign and verify are within the {FLOOR_TARGET} floor target")
    return status


if __name__ == "__main__":
    sys.exit(main())
