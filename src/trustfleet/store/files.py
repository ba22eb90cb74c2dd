"""Files written so that a crash or a power cut leaves the old content or the new, never a
mix: device state (a terminal's secure module, a secure element's non-volatile memory, a
host's binding store), the CA's PEMs.

:func:`atomic_write` is the one way such a file changes: write a temporary file beside the
target, fsync it, rename it over the target, fsync the directory. A power cut at any byte of
that sequence leaves the previous file or the new one; at worst a stale temporary file,
which :func:`remove_stale_temporaries` clears at the next start.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from trustfleet.errors import DataDirPermissions

#: called before each step of a write: ("write", byte index), ("fsync", 0), ("rename", 0),
#: ("dir-fsync", 0); a test raises from it to cut the power there
WriteHook = Callable[[str, int], None]

_TMP_SUFFIX = ".tmp"
PRIVATE_DIRECTORY_MODE = 0o700


class PowerCut(Exception):
    """Raised by a test's write hook: the power failed at this point."""


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    exclusive: bool = False,
    hook: WriteHook | None = None,
) -> None:
    """Replace ``path`` with ``data`` (owner-only by default) so that a crash leaves old or
    new; the file has ``mode`` before it appears under its name. With ``exclusive`` an
    existing file is never replaced: FileExistsError (a key file made once)."""
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write(handle.fileno(), data, hook)
            if hook:
                hook("fsync", 0)
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if hook:
            hook("rename", 0)
        if exclusive:
            os.link(tmp_name, path)  # unlike a rename, fails if path exists
            os.unlink(tmp_name)
        else:
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


def make_private_directory(path: Path) -> None:
    """``path`` exists (parents too) and is owner-only (0700): made so, or tightened if an
    existing one let others in."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIRECTORY_MODE)
    if stat.S_IMODE(path.stat().st_mode) & ~PRIVATE_DIRECTORY_MODE & 0o777:
        os.chmod(path, PRIVATE_DIRECTORY_MODE)


def check_private_directory(path: Path, what: str = "the data directory") -> None:
    """Refuse (:class:`DataDirPermissions`) a directory group or others may read, write or
    enter; a missing one is not checked (nothing in it to protect)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DataDirPermissions(
            f"{what} {path} is open to group or others (mode {mode:o}): its database and"
            " files would be readable by other users",
            hint=f"chmod 700 {path}",
        )


def read_small_file(path: Path, limit: int) -> bytes:
    """The file's bytes; ValueError if it is larger than ``limit``; OSError as raised."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data
