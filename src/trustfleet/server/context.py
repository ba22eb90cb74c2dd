"""What every request handler and CLI verb needs, built once per process from settings.

Holds no protocol or session state: everything that must survive between requests lives in
the database, so any node can serve any request. The one thing kept in memory is the count
of refused requests not audited one by one (:mod:`trustfleet.store.refusals`), per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from trustfleet.keystore.base import KeyStore
from trustfleet.settings import Settings
from trustfleet.store import Database
from trustfleet.store.refusals import RefusalAudit


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    #: the unit-of-work entry point every use case runs its database work through
    db: Database
    keystore: KeyStore
    #: audits refused requests at a bounded rate (built from the settings)
    refusals: RefusalAudit = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        refusals = RefusalAudit(
            self.db,
            window_seconds=self.settings.refusal_audit_window,
            clients=self.settings.refusal_audit_clients,
        )
        object.__setattr__(self, "refusals", refusals)

    @property
    def engine(self) -> Engine:
        return self.db.engine
