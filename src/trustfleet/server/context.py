"""What every request handler and CLI verb needs, built once per process from settings.

Holds no protocol or session state: everything that must survive between requests lives in
the database, so any node can serve any request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keystore.base import KeyStore
from trustfleet.settings import Settings
from trustfleet.store import Database


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    keystore: KeyStore
    #: the unit-of-work entry point every use case runs its database work through
    db: Database = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "db", Database(self.engine))
