"""Fixtures for the crypto tests: keys are costly (RSA-3072 above all), so each
suite's keys are made once per session."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustfleet.crypto import SUITES, generate_private_key, get_suite
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, Suite


@dataclass(frozen=True)
class SuiteKeys:
    suite: Suite
    signing: PrivateKey
    other_signing: PrivateKey
    kem: PrivateKey
    other_kem: PrivateKey


_CACHE: dict[str, SuiteKeys] = {}


def keys_for(name: str) -> SuiteKeys:
    if name not in _CACHE:
        suite = get_suite(name)
        _CACHE[name] = SuiteKeys(
            suite=suite,
            signing=suite.generate_signing_key(),
            other_signing=suite.generate_signing_key(),
            kem=suite.generate_kem_key(),
            other_kem=suite.generate_kem_key(),
        )
    return _CACHE[name]


@pytest.fixture(params=sorted(SUITES))
def suite_keys(request: pytest.FixtureRequest) -> SuiteKeys:
    return keys_for(request.param)


class OpenSSL:
    """The openssl command-line tool, run in a temporary directory."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir

    def write(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        path.write_bytes(data)
        return path

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.binary, *map(str, args)], capture_output=True, check=check, timeout=30
        )


@pytest.fixture
def openssl(tmp_path: Path) -> OpenSSL:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("the openssl command-line tool is not installed")
    return OpenSSL(binary, tmp_path)


_HAS_SM2: dict[str, bool] = {}


def _has_sm2(binary: str) -> bool:
    """OpenSSL 3 with SM2 signatures and SM2 encryption (some builds leave SM2 out)."""
    if binary not in _HAS_SM2:

        def listed(kind: str) -> bool:
            result = subprocess.run([binary, "list", kind], capture_output=True, timeout=30)
            return result.returncode == 0 and b"SM2" in result.stdout

        _HAS_SM2[binary] = listed("-signature-algorithms") and listed("-asymcipher-algorithms")
    return _HAS_SM2[binary]


@pytest.fixture
def openssl_sm2(openssl: OpenSSL) -> OpenSSL:
    """The openssl tool, if it signs and encrypts with SM2; the test is skipped if not."""
    if not _has_sm2(openssl.binary):
        pytest.skip("this openssl has no SM2 signatures or encryption (needs OpenSSL 3 with SM2)")
    return openssl


_KEYS: dict[KeyAlgorithm, PrivateKey] = {}

ASYMMETRIC = [alg for alg in KeyAlgorithm if alg.is_asymmetric]


def key_of(alg: KeyAlgorithm) -> PrivateKey:
    """One generated private key per algorithm, shared by the session."""
    if alg not in _KEYS:
        _KEYS[alg] = generate_private_key(alg)
    return _KEYS[alg]
