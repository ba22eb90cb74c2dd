"""The reference POS terminal: its factory output, the working-key rules it enforces (usage,
mode of use, the TMK that protects a block), PIN blocks that interoperate with ``psec``,
and the ``trustfleet emulate pos`` / ``trustfleet tmk`` command lines."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psec import pinblock as psec_pinblock
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from harness import run_cli
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import pinblock, tr31
from trustfleet.crypto.payment.kcv import kcv
from trustfleet.errors import InvalidInput
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, make_session_factory, migrate
from trustfleet.tmk import registry
from trustfleet.tmk.errors import (
    ScmExists,
    ScmNoTmk,
    TmkUntrustedServerCertificate,
    TmkWorkingKeyRefused,
)
from trustfleet.tmk.models import DownloadSession
from trustfleet.tmk.terminal import (
    PosTerminal,
    Transport,
)

from .conftest import PAN, ServiceTransport, Tmk

# =====================================================================================
# A terminal with a TMK, from a real (SQLite) key server in process
# =====================================================================================


@dataclass
class Server:
    tmk: Tmk
    sessions: sessionmaker[Session]
    transport: Transport
    root_pem: bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('ks') / 'tf.db'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    db = Database(engine)
    keystore = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
    tmk = Tmk.build(db, sessions, keystore)
    tmk.identity.ensure(actor="test")
    yield Server(tmk, sessions, ServiceTransport(tmk), tmk.identity.root().pem.encode())
    engine.dispose()


_counter = iter(range(10_000))


def new_terminal(server: Server, tmp_path: Path, *, download: bool = True) -> PosTerminal:
    sn = f"POS-T{next(_counter)}"
    record = PosTerminal.factory(tmp_path / sn, sn, root_pem=server.root_pem)
    server.tmk.register(record.public_key_pem, sn, model="m")
    terminal = PosTerminal.open(tmp_path / sn)
    if download:
        terminal.download(server.transport)
    return terminal


def tmk_of(terminal: PosTerminal) -> bytes:
    """White box: the TMK inside the SCM, to forge blocks under it."""
    return terminal.scm._installed().key


def block(
    kbpk: bytes,
    usage: str = "P0",
    mode: str = "E",
    key: bytes = bytes(range(16)),
    optional: list[tuple[str, str]] | None = None,
) -> str:
    header = tr31.KeyBlockHeader("D", usage, "A", mode, optional_blocks=optional or [])
    return tr31.wrap(kbpk, header, key)


# =====================================================================================
# Factory
# =====================================================================================


def test_factory_writes_a_private_scm_and_an_importable_public_record(
    server: Server, tmp_path: Path
) -> None:
    record = PosTerminal.factory(
        tmp_path / "t", "POS-F1", KeyAlgorithm.SM2, root_pem=server.root_pem
    )
    files = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"device.key", "scm.json", "ksrcrt.pem", "record.ndjson"} <= files
    for private in ("device.key", "scm.json"):
        assert stat.S_IMODE((tmp_path / "t" / private).stat().st_mode) == 0o600
    scm_file = (tmp_path / "t" / "scm.json").read_text()
    assert "POS-F1" not in scm_file  # the SCM file is ciphertext, even the SN
    lines = (tmp_path / "t" / "record.ndjson").read_text().splitlines()
    (row,) = registry.read_ndjson(lines)
    assert isinstance(row, registry.RawRecord) and row.sn == "POS-F1"
    assert row.public_key == record.public_key_pem and "PRIVATE" not in lines[0]
    with pytest.raises(ScmExists):
        PosTerminal.factory(tmp_path / "t", "POS-F1")
    assert PosTerminal.open(tmp_path / "t").roots[0].subject.rfc4514_string() == "CN=tmk-ksrcrt"


def test_a_terminal_without_a_root_trusts_no_server(server: Server, tmp_path: Path) -> None:
    sn = "POS-NOROOT"
    record = PosTerminal.factory(tmp_path / sn, sn)
    server.tmk.register(record.public_key_pem, sn, model="m")
    with pytest.raises(TmkUntrustedServerCertificate):
        PosTerminal.open(tmp_path / sn).download(server.transport)


# =====================================================================================
# Working keys: what the terminal accepts
# =====================================================================================


def test_a_genuine_pin_key_block_is_accepted_and_checked_on_every_use(
    server: Server, tmp_path: Path
) -> None:
    terminal = new_terminal(server, tmp_path)
    tmk = tmk_of(terminal)
    key = os.urandom(16)
    kc = "01" + kcv(KeyAlgorithm.AES_128, key).hex().upper()
    kp = "01" + terminal.scm.tmk_kcv.hex().upper()
    received = terminal.install_working_key(
        block(tmk, key=key, optional=[("KC", kc), ("KP", kp)]), "P0"
    )
    assert received.kcv == kcv(KeyAlgorithm.AES_128, key) and received.mode_of_use == "E"
    pin_block = terminal.encrypt_pin("1234", PAN)
    assert psec_pinblock.decipher_pinblock_iso_4(key, pin_block, PAN) == "1234"


@pytest.mark.parametrize(
    ("forge", "error"),
    [
        (lambda tmk: block(tmk, mode="B"), tr31.Tr31ModeMismatch),  # PIN key usable to decrypt
        (lambda tmk: block(tmk, mode="D"), tr31.Tr31ModeMismatch),
        (lambda tmk: block(tmk, usage="D0", mode="E"), tr31.Tr31UsageMismatch),
        (lambda tmk: block(tmk, usage="K0", mode="E"), tr31.Tr31UsageMismatch),
        (lambda tmk: block(os.urandom(16)), tr31.Tr31MacMismatch),  # under another TMK
        (lambda tmk: block(tmk).replace("P0AE", "P0AB", 1), tr31.Tr31MacMismatch),  # edited
        (lambda tmk: block(tmk, optional=[("KP", "01" + "00" * 5)]), TmkWorkingKeyRefused),
        (lambda tmk: block(tmk, optional=[("KC", "01" + "00" * 5)]), TmkWorkingKeyRefused),
    ],
    ids=[
        "pin-key-mode-both",
        "pin-key-mode-decrypt",
        "data-key-as-pin-key",
        "kek-as-pin-key",
        "other-tmk",
        "edited-header",
        "kp-names-other-tmk",
        "kc-mismatch",
    ],
)
def test_the_terminal_refuses_working_keys_it_must_not_use(
    server: Server, tmp_path: Path, forge: object, error: type[Exception]
) -> None:
    terminal = new_terminal(server, tmp_path)
    forged = forge(tmk_of(terminal))  # type: ignore[operator]
    with pytest.raises(error):
        terminal.install_working_key(forged, "P0")
    with pytest.raises(TmkWorkingKeyRefused):  # nothing was stored
        terminal.encrypt_pin("1234", PAN)


def test_usages_the_terminal_has_no_use_for_are_refused(server: Server, tmp_path: Path) -> None:
    terminal = new_terminal(server, tmp_path)
    with pytest.raises(TmkWorkingKeyRefused):
        terminal.install_working_key(block(tmk_of(terminal), usage="K0"), "K0")


def test_no_working_key_without_a_tmk(server: Server, tmp_path: Path) -> None:
    terminal = new_terminal(server, tmp_path, download=False)
    with pytest.raises(ScmNoTmk):
        terminal.install_working_key(block(os.urandom(16)), "P0")


def test_a_new_tmk_voids_the_working_keys_of_the_old_one(server: Server, tmp_path: Path) -> None:
    terminal = new_terminal(server, tmp_path)
    issued = server.tmk.working_keys.issue(terminal.sn, "P0", actor="tms")
    terminal.install_working_key(issued.key_block, "P0")
    server.tmk.terminals.request_rotation(terminal.sn, actor="ops")
    terminal.download(server.transport)
    assert terminal.working_keys() == {}
    with pytest.raises(tr31.Tr31MacMismatch):  # the old block no longer opens
        terminal.install_working_key(issued.key_block, "P0")


def test_a_refused_download_is_reported_to_the_server(server: Server, tmp_path: Path) -> None:
    terminal = new_terminal(server, tmp_path, download=False)
    (terminal.directory / "ksrcrt.pem").write_bytes(_foreign_root())  # same name, other key
    with pytest.raises(TmkUntrustedServerCertificate):
        terminal.download(server.transport)
    with server.sessions() as session:
        (row,) = session.scalars(select(DownloadSession).where(DownloadSession.sn == terminal.sn))
    assert (row.stage, row.error_code) == ("aborted", "tmk-terminal-aborted")
    assert server.tmk.terminals.overview(terminal.sn).active_tmk is None


def _foreign_root() -> bytes:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "tmk-ksrcrt")])  # same name
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


# =====================================================================================
# PIN blocks, against psec
# =====================================================================================


@pytest.mark.parametrize(
    ("pin", "pan"),
    [
        ("1234", "4111111111111111"),
        ("123456789012", "1234567890123456789"),
        ("0000", "123456789012"),
    ],
)
def test_format_4_pin_blocks_interoperate_with_psec(pin: str, pan: str) -> None:
    key = os.urandom(16)
    encrypt, decrypt = pinblock.ecb_cipher(KeyAlgorithm.AES_128, key)
    ours = pinblock.format4_encipher(encrypt, pin, pan)
    assert psec_pinblock.decipher_pinblock_iso_4(key, ours, pan) == pin
    theirs = psec_pinblock.encipher_pinblock_iso_4(key, pin, pan)
    assert pinblock.format4_decipher(decrypt, theirs, pan) == pin
    assert pinblock.format4_encipher(encrypt, pin, pan) != ours  # random fill: never the same


def test_format_4_pin_and_pan_fields_match_psec() -> None:
    fill = bytes.fromhex("0123456789ABCDEF")
    ours = pinblock.format4_encipher(lambda b: b, "1234", PAN, random=lambda n: fill)
    pin_field = psec_pinblock.encode_pin_field_iso_4("1234")
    pan_field = psec_pinblock.encode_pan_field_iso_4(PAN)
    expected_pin_field = pin_field[:8] + fill
    assert ours == bytes(a ^ b for a, b in zip(expected_pin_field, pan_field, strict=True))


def test_format_0_matches_the_ansi_layout_and_psec() -> None:
    clear = pinblock.format0_encipher(lambda b: b, "1234", PAN)
    assert clear.hex().upper() == "041225EEEEEEEEEE"  # 041234FFFFFFFFFF xor 0000111111111111
    assert clear == psec_pinblock.encode_pinblock_iso_0("1234", PAN)
    key = os.urandom(16)
    encrypt, decrypt = pinblock.ecb_cipher(KeyAlgorithm.TDES, key)
    block_0 = pinblock.format0_encipher(encrypt, "987654", PAN)
    assert psec_pinblock.decode_pinblock_iso_0(decrypt(block_0), PAN) == "987654"
    assert pinblock.format0_decipher(decrypt, block_0, PAN) == "987654"


def test_a_pin_block_for_another_pan_or_key_does_not_decipher() -> None:
    key = os.urandom(32)
    encrypt, decrypt = pinblock.ecb_cipher(KeyAlgorithm.AES_256, key)
    enciphered = pinblock.format4_encipher(encrypt, "1234", PAN)
    with pytest.raises(pinblock.PinBlockInvalid):
        pinblock.format4_decipher(decrypt, enciphered, "5500000000000004")
    _, other = pinblock.ecb_cipher(KeyAlgorithm.AES_256, os.urandom(32))
    with pytest.raises(pinblock.PinBlockInvalid):
        pinblock.format4_decipher(other, enciphered, PAN)


@pytest.mark.parametrize(
    ("pin", "pan"), [("123", PAN), ("1234567890123", PAN), ("12a4", PAN), ("1234", "41111x")]
)
def test_bad_pins_and_pans_are_input_errors(pin: str, pan: str) -> None:
    encrypt, _ = pinblock.ecb_cipher(KeyAlgorithm.AES_128, bytes(16))
    with pytest.raises(InvalidInput):
        pinblock.format4_encipher(encrypt, pin, pan)


# =====================================================================================
# Command lines
# =====================================================================================


run = run_cli


@pytest.mark.slow
def test_cli_factory_import_and_rejections(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run(data, "init")
    root = tmp_path / "ksrcrt.pem"
    run(data, "tmk", "identity", "init")
    run(data, "tmk", "identity", "show", "--root-out", str(root))
    pos = tmp_path / "pos"
    run(
        data,
        "emulate",
        "pos",
        "factory",
        "--sn",
        "CLI-POS-1",
        "--out",
        str(pos),
        "--root",
        str(root),
    )
    record = json.loads((pos / "record.ndjson").read_text())

    rows = tmp_path / "terminals.csv"
    with rows.open("w") as out:
        out.write("sn,model,public_key\n")
        out.write(f'CLI-POS-1,A920,"{record["public_key"]}"\n')
        for i in range(1999):
            key = record["public_key"] if i % 500 else "garbage"
            out.write(f'CLI-BULK-{i},A920,"{key}"\n')
    first = run(data, "tmk", "import", str(rows), check=False)
    assert first.returncode == 1, first.stderr  # rows were rejected
    assert "2000 rows: 1996 registered, 0 unchanged, 4 rejected" in first.stdout
    assert "2000/2000" in first.stderr  # progress counts records
    rejected = [
        json.loads(line) for line in rows.with_name("terminals.csv.rejections.ndjson").open()
    ]
    assert [(r["row"], r["code"]) for r in rejected] == [
        (2, "malformed-key"),
        (502, "malformed-key"),
        (1002, "malformed-key"),
        (1502, "malformed-key"),
    ]
    again = run(data, "tmk", "import", str(rows), "--allow-rejects")
    assert "0 registered, 1996 unchanged, 4 rejected" in again.stdout
    shown = run(data, "tmk", "show", "CLI-POS-1")
    assert "CLI-POS-1" in shown.stdout and "none" in shown.stdout
    refused = run(data, "tmk", "working-key", "CLI-POS-1", "--usage", "P0", check=False)
    assert refused.returncode == 1 and "tmk-no-active-tmk" in refused.stderr
