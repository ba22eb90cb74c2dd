"""``trustfleet init``: everything a fresh data directory needs, each step idempotent."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trustfleet.settings import INITIALISED_MARKER, Settings
from trustfleet.store.files import atomic_write, make_private_directory


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    root_ca_pem_path: Path
    admin_token: str | None  # None when the directory was already initialised


def is_initialised(settings: Settings) -> bool:
    return settings.initialised


def _ensure_master_key(settings: Settings) -> None:
    from trustfleet.keystore.master import MASTER_KEY_ENV, create_master_key_file

    if settings.keystore_backend.strip().lower() == "pkcs11":
        return  # the token is the root of trust: its key encryption key is made on opening
    path = settings.resolved_master_key_file
    if os.environ.get(MASTER_KEY_ENV) or path.exists():
        return
    create_master_key_file(path)


def initialise(settings: Settings) -> InitResult:
    """Master key (0600; none with PKCS#11), migrated database, local root + issuing CA,
    first admin token; the directory and every file in it owner-only (0700, 0600)."""
    from trustfleet.pki.service import bootstrap as bootstrap_local_ca
    from trustfleet.server.auth import bootstrap_admin_token
    from trustfleet.server.runner import build_context

    make_private_directory(settings.data_dir)  # an existing one is tightened to 0700
    if is_initialised(settings):
        return InitResult(settings.data_dir, settings.ca_dir / "root.pem", None)
    _ensure_master_key(settings)
    context = build_context(settings)
    bootstrap_local_ca(context.db, context.keystore, context.settings.ca_dir)
    token = bootstrap_admin_token(context.db)
    atomic_write(settings.data_dir / INITIALISED_MARKER, b"1\n")
    return InitResult(settings.data_dir, settings.ca_dir / "root.pem", token)
