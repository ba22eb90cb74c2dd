"""Where the CLI finds the API token of a remote server: ``TRUSTFLEET_TOKEN``, else the
login file that ``trustfleet login`` writes. Never the command line: an argument shows in
``ps`` and in the shell's history.

The login file is ``<user config dir>/trustfleet/credentials.json`` (``~/.config`` on
Linux; ``XDG_CONFIG_HOME`` moves it), mode 0600 in a 0700 directory, one token per server
URL. A file that others may read is refused until its mode is fixed, as ssh does with keys.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from platformdirs import user_config_dir

from trustfleet.kit.client import UsageProblem
from trustfleet.store.files import atomic_write

TOKEN_ENV = "TRUSTFLEET_TOKEN"  # noqa: S105 - the variable's name, not a token
CREDENTIALS_FILE = "credentials.json"


class CredentialsUnsafe(UsageProblem):
    code = "credentials-unsafe"
    title = "The login file can be read by other users"


class CredentialsUnreadable(UsageProblem):
    code = "credentials-unreadable"
    title = "The login file cannot be read"


def credentials_path() -> Path:
    return Path(user_config_dir("trustfleet", appauthor=False)) / CREDENTIALS_FILE


def server_key(url: str) -> str:
    """The login file's key for a server URL: scheme and host in lower case, no trailing
    slash, so ``HTTPS://Host:8443/`` and ``https://host:8443`` share a token."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def _load(path: Path) -> dict[str, Any]:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return {}
    if mode & 0o077:
        raise CredentialsUnsafe(
            f"{path} has mode {mode:04o}: other users may read its tokens",
            hint=f"chmod 600 {path}",
        )
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CredentialsUnreadable(
            f"{path} is not a trustfleet login file ({exc})",
            hint=f"remove it and run `trustfleet login` again: rm {path}",
        ) from None
    servers = loaded.get("servers") if isinstance(loaded, dict) else None
    return servers if isinstance(servers, dict) else {}


def stored_token(url: str, path: Path | None = None) -> str | None:
    """The token ``trustfleet login`` stored for ``url``, or None."""
    entry = _load(path or credentials_path()).get(server_key(url))
    token = entry.get("token") if isinstance(entry, dict) else None
    return token if isinstance(token, str) and token else None


def token_for(url: str) -> str | None:
    """``TRUSTFLEET_TOKEN`` if set, else the login file's token for ``url``."""
    return os.environ.get(TOKEN_ENV) or stored_token(url)


def store_token(url: str, token: str, *, name: str, role: str, path: Path | None = None) -> Path:
    """Keep ``token`` for ``url`` in the login file (0600); the file's path."""
    target = path or credentials_path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    servers = _load(target)
    servers[server_key(url)] = {"token": token, "name": name, "role": role}
    atomic_write(target, json.dumps({"servers": servers}, indent=2).encode(), mode=0o600)
    return target


def forget_token(url: str, path: Path | None = None) -> bool:
    """Remove the token stored for ``url``; whether there was one."""
    target = path or credentials_path()
    servers = _load(target)
    if servers.pop(server_key(url), None) is None:
        return False
    atomic_write(target, json.dumps({"servers": servers}, indent=2).encode(), mode=0o600)
    return True
