"""Key stores: where every private and secret key lives (see :mod:`.base`).

:func:`open_keystore` picks the backend from the settings: ``soft`` (keys in the database,
wrapped under the master key) or ``pkcs11`` (the token is the root of trust: signing keys
inside it, every other key sealed under a key that never leaves it; :mod:`.hsm`).
"""

from __future__ import annotations

import os
from contextlib import suppress
from typing import TYPE_CHECKING

from trustfleet.errors import ConfigurationError
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage

if TYPE_CHECKING:
    from trustfleet.keystore.hsm import HsmKeyStore
    from trustfleet.keystore.master import MasterKeyring
    from trustfleet.keystore.soft import SoftKeyStore
    from trustfleet.settings import Settings
    from trustfleet.store import Database

__all__ = ["KeyInfo", "KeyStore", "KeyUsage", "open_keystore"]

BACKENDS = ("soft", "pkcs11")


def open_keystore(settings: Settings, db: Database) -> KeyStore:
    """The configured key store. The soft store loads the master keyring now
    (``TRUSTFLEET_MASTER_KEY`` first, else the master key file) and checks that it opens the
    stored keys, so a missing, unreadable or wrong master key fails at start-up with
    MasterKeyError rather than on the first key use."""
    backend = settings.keystore_backend.strip().lower()
    if backend == "soft":
        from trustfleet.keystore.master import load_master_keyring
        from trustfleet.keystore.soft import SoftKeyStore

        store = SoftKeyStore(db, load_master_keyring(settings.resolved_master_key_file))
        _check_master_key(store, db)
        return store
    if backend == "pkcs11":
        from trustfleet.keystore.hsm import HsmKeyStore

        if not settings.pkcs11_module:
            raise ConfigurationError("keystore_backend is pkcs11 but pkcs11_module is not set")
        hsm = HsmKeyStore(
            db,
            settings.pkcs11_module,
            settings.pkcs11_token_label,
            settings.pkcs11_user_pin,
            policy=settings.pkcs11_policy,
            master=_unsealed_rows_keyring(settings),
        )
        try:
            _check_master_key(hsm, db)
        except BaseException:
            hsm.close()
            raise
        return hsm
    raise ConfigurationError(
        f"unknown keystore_backend {settings.keystore_backend!r}; use one of {', '.join(BACKENDS)}"
    )


def _unsealed_rows_keyring(settings: Settings) -> MasterKeyring | None:
    """The soft store's master keys, if some are configured: with PKCS#11 they only open
    rows that ``trustfleet keystore seal`` has not moved under the token yet."""
    from trustfleet.errors import MasterKeyError
    from trustfleet.keystore.master import MASTER_KEY_ENV, load_master_keyring

    if not (os.environ.get(MASTER_KEY_ENV) or settings.resolved_master_key_file.exists()):
        return None
    try:
        return load_master_keyring(settings.resolved_master_key_file)
    except MasterKeyError:
        return None


def _check_master_key(store: SoftKeyStore | HsmKeyStore, db: Database) -> None:
    from sqlalchemy.exc import DBAPIError

    # no keystore table yet (database not migrated), so nothing to check: the reads run on
    # the driver, whose own error says so (connecting raises SQLAlchemy's)
    with suppress(DBAPIError, db.engine.dialect.loaded_dbapi.Error):
        store.check_master_key()
