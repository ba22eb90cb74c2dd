"""Key stores: where every private and secret key lives (see :mod:`.base`).

:func:`open_keystore` picks the backend from the settings: ``soft`` (keys in the database,
wrapped under the master key) or ``pkcs11`` (keys inside a PKCS#11 token).
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING

from trustfleet.errors import ConfigurationError
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage

if TYPE_CHECKING:
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
        from trustfleet.keystore.pkcs11 import Pkcs11KeyStore

        if not settings.pkcs11_module:
            raise ConfigurationError("keystore_backend is pkcs11 but pkcs11_module is not set")
        return Pkcs11KeyStore(
            settings.pkcs11_module, settings.pkcs11_token_label, settings.pkcs11_user_pin
        )
    raise ConfigurationError(
        f"unknown keystore_backend {settings.keystore_backend!r}; use one of {', '.join(BACKENDS)}"
    )


def _check_master_key(store: SoftKeyStore, db: Database) -> None:
    from sqlalchemy.exc import DBAPIError

    # no keystore table yet (database not migrated), so nothing to check: the reads run on
    # the driver, whose own error says so (connecting raises SQLAlchemy's)
    with suppress(DBAPIError, db.engine.dialect.loaded_dbapi.Error):
        store.check_master_key()
