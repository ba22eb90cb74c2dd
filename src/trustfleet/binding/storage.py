"""The applet's non-volatile store, written with :func:`trustfleet.store.files.atomic_write`.

The NV store holds one record (the whole persistent state) behind a two-method
interface, so tests can swap in memory or inject a power cut at every write step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from trustfleet.store.files import (
    PowerCut,
    WriteHook,
    atomic_write,
    read_small_file,
    remove_stale_temporaries,
)

__all__ = ["FileNvStore", "MemoryNvStore", "NvStore", "PowerCut"]


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
