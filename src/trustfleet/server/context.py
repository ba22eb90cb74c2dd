"""What every request handler and CLI verb needs, built once per process from settings.

Holds no protocol or session state: everything that must survive between requests lives in
the database, so any node can serve any request.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from trustfleet.keystore.base import KeyStore
from trustfleet.settings import Settings
from trustfleet.store import Database


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    #: the unit-of-work entry point every use case runs its database work through
    db: Database
    keystore: KeyStore

    @property
    def engine(self) -> Engine:
        return self.db.engine
