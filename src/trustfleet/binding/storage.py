"""Device-file helpers: atomic whole-file writes and the applet's non-volatile store.

:func:`atomic_write` is the one way a device file changes: write a temporary file beside
the target, fsync it, rename it over the target, fsync the directory. A power cut at any
byte of that sequence leaves the previous file or the new one, never a mix; at worst a
stale temporary file, which :func:`remove_stale_temporaries` clears at the next start.

The applet's NV store holds one record (the whole persistent state) behind a two-method
interface, so tests can swap in memory or inject a power cut at every write step.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

#: called before each step of a write: ("write", byte index), ("fsync", 0), ("rename", 0),
#: ("dir-fsync", 0); a test raises from it to cut the power there
WriteHook = Callable[[str, int], None]

_TMP_SUFFIX = ".tmp"


class PowerCut(Exception):
    """Raised by a test's write hook: the power failed at this point."""


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, data: bytes, *, hook: WriteHook | None = None) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves old or new."""
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write(handle.fileno(), data, hook)
            if hook:
                hook("fsync", 0)
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o600)
        if hook:
            hook("rename", 0)
        os.replace(tmp_name, path)
    except PowerCut:
        raise  # a real cut leaves the temporary file behind; so does a simulated one
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if hook:
        hook("dir-fsync", 0)
    _fsync_directory(path.parent)


def _write(fd: int, data: bytes, hook: WriteHook | None) -> None:
    if hook is None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    for index in range(len(data)):  # byte by byte, so a test can cut after any byte
        hook("write", index)
        os.write(fd, data[index : index + 1])


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a power cut left beside ``path``."""
    for stale in path.parent.glob(f"{_tmp_prefix(path)}*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def read_small_file(path: Path, limit: int) -> bytes:
    """The file's bytes; ValueError if it is larger than ``limit``; OSError as raised."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data


class NvStore(Protocol):
    """The applet's non-volatile memory: one record, replaced atomically."""

    def load(self) -> bytes | None: ...

    def store(self, record: bytes) -> None: ...


class MemoryNvStore:
    """NV memory in RAM (tests, benchmarks): survives power cycles of the applet object."""

    def __init__(self, record: bytes | None = None) -> None:
        self.record = record
        self.writes = 0

    def load(self) -> bytes | None:
        return self.record

    def store(self, record: bytes) -> None:
        self.record = record
        self.writes += 1


class FileNvStore:
    """NV memory in a file, written with :func:`atomic_write`."""

    MAX_SIZE = 64 * 1024

    def __init__(self, path: str | os.PathLike[str], *, hook: WriteHook | None = None) -> None:
        self.path = Path(path)
        self.hook = hook

    def load(self) -> bytes | None:
        remove_stale_temporaries(self.path)
        try:
            return read_small_file(self.path, self.MAX_SIZE)
        except FileNotFoundError:
            return None

    def store(self, record: bytes) -> None:
        atomic_write(self.path, record, hook=self.hook)
