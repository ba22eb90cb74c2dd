"""A terminal's state on the key server, as operators change and read it: suspend, revoke,
re-activate, ask for a new TMK (rotation), and the overview of its keys.

Each change is one unit of work under the terminal's row lock: the status, the downloads it
ends and the keys it retires commit together or not at all (the keys are destroyed after
the commit), so a crash can never leave a revoked terminal with an active TMK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import InvalidInput
from trustfleet.keystore.base import KeyStore
from trustfleet.store import Database, UnitOfWork
from trustfleet.tmk import lifecycle
from trustfleet.tmk.errors import TmkTerminalStateConflict, TmkUnknownTerminal
from trustfleet.tmk.models import DownloadPolicy, Terminal, TerminalMasterKey, WorkingKey
from trustfleet.tmk.protocol import TMK_ALGORITHMS
from trustfleet.wire import as_utc, utcnow

DEFAULT_TMK_ALGORITHM = KeyAlgorithm.AES_128

#: action -> (the statuses it applies to, the status it sets)
TRANSITIONS = {
    "suspend": (frozenset({"active"}), "suspended"),
    "revoke": (frozenset({"active", "suspended"}), "revoked"),
    "reactivate": (frozenset({"suspended"}), "active"),
}


@dataclass(frozen=True)
class TmkInfo:
    algorithm: str
    kcv: str
    status: str
    session_id: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None


@dataclass(frozen=True)
class WorkingKeyInfo:
    usage: str
    algorithm: str
    key_version: str
    kcv: str
    created_at: datetime


@dataclass(frozen=True)
class TerminalSummary:
    """A terminal as a listing shows it."""

    sn: str
    model: str
    key_algorithm: str
    status: str
    registered_by: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TerminalOverview:
    sn: str
    model: str
    key_algorithm: str
    status: str
    registered_by: str
    created_at: datetime
    updated_at: datetime
    tmk_algorithm: str
    rotation_requested: bool
    active_tmk: TmkInfo | None
    working_keys: list[WorkingKeyInfo]
    tmk_history: int


_SUMMARY_COLUMNS = (
    Terminal.sn,
    Terminal.model,
    Terminal.key_algorithm,
    Terminal.status,
    Terminal.registered_by,
    Terminal.created_at,
    Terminal.updated_at,
)
_TERMINAL = select(*_SUMMARY_COLUMNS).where(Terminal.sn == bindparam("b_sn"))
_TERMINAL_LOCKED = _TERMINAL.with_for_update()
_SET_STATUS = (
    update(Terminal)
    .where(Terminal.sn == bindparam("b_sn"))
    .values(status=bindparam("status"), updated_at=bindparam("b_now"))
)
_POLICY = select(DownloadPolicy.tmk_algorithm, DownloadPolicy.rotation_requested_at).where(
    DownloadPolicy.sn == bindparam("b_sn")
)
_REQUEST_ROTATION = (
    update(DownloadPolicy)
    .where(DownloadPolicy.sn == bindparam("b_sn"))
    .values(
        tmk_algorithm=bindparam("tmk_algorithm"),
        rotation_requested_at=bindparam("b_now"),
        requested_by=bindparam("actor"),
        updated_at=bindparam("b_now"),
    )
)
_ACTIVE_TMK = select(
    TerminalMasterKey.algorithm,
    TerminalMasterKey.kcv_hex,
    TerminalMasterKey.status,
    TerminalMasterKey.session_id,
    TerminalMasterKey.created_at,
    TerminalMasterKey.activated_at,
    TerminalMasterKey.retired_at,
).where(TerminalMasterKey.active_sn == bindparam("b_sn"))
_ACTIVE_WORKING_KEYS = (
    select(
        WorkingKey.usage,
        WorkingKey.algorithm,
        WorkingKey.key_version,
        WorkingKey.kcv_hex,
        WorkingKey.created_at,
    )
    .where(WorkingKey.sn == bindparam("b_sn"), WorkingKey.status == "active")
    .order_by(WorkingKey.usage)
)
_TMK_HISTORY = (
    select(func.count())
    .select_from(TerminalMasterKey)
    .where(TerminalMasterKey.sn == bindparam("b_sn"))
)


class Terminals:
    """Operators' changes to terminals, and what they read about them."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        *,
        clock: Callable[[], datetime] = utcnow,
        default_tmk_algorithm: KeyAlgorithm = DEFAULT_TMK_ALGORITHM,
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock
        self._default_algorithm = default_tmk_algorithm

    def _now(self) -> datetime:
        return as_utc(self._clock())

    def change_status(
        self, sn: str, action: str, *, actor: str, reason: str = ""
    ) -> TerminalOverview:
        """``suspend`` (active -> suspended), ``revoke`` (final) or ``reactivate``
        (suspended -> active). Suspending or revoking ends the terminal's open downloads;
        revoking also retires its TMK and working keys, destroyed after the commit (a
        revoked terminal never gets keys again)."""
        if action not in TRANSITIONS:
            raise InvalidInput(f"unknown status change {action!r}")
        allowed_from, target = TRANSITIONS[action]
        now = self._now()
        with self._db.work() as uow:
            previous = self._locked(uow, sn).status
            if previous not in allowed_from:
                raise TmkTerminalStateConflict(f"cannot {action} a terminal that is {previous}")
            uow.run(_SET_STATUS, b_sn=sn, status=target, b_now=now)
            if target in ("suspended", "revoked"):
                code = f"tmk-terminal-{target}"
                lifecycle.abort_open_sessions(uow, self._keystore, sn, code, now)
            if target == "revoked":
                lifecycle.retire_active_tmk(uow, self._keystore, sn, now)
            uow.audit(
                f"tmk.terminal_{target}",
                actor=actor,
                subject=sn,
                details={"from": previous, "reason": reason[:200]},
            )
        return self.overview(sn)

    def request_rotation(
        self, sn: str, *, actor: str, algorithm: KeyAlgorithm | None = None
    ) -> TerminalOverview:
        """Allow (and ask for) a new download: the next completed one retires the current
        TMK and its working keys. ``algorithm`` sets the TMK algorithm of this terminal."""
        if algorithm is not None and algorithm not in TMK_ALGORITHMS:
            raise InvalidInput("a TMK is aes-128, aes-256 or tdes")
        now = self._now()
        with self._db.work() as uow:
            lifecycle.check_status(sn, self._locked(uow, sn).status)
            policy = uow.one(_POLICY.with_for_update(), b_sn=sn)
            tmk_algorithm = (
                algorithm.value
                if algorithm is not None
                else policy.tmk_algorithm
                if policy
                else self._default_algorithm.value
            )
            values = {"tmk_algorithm": tmk_algorithm, "rotation_requested_at": now}
            if policy is None:
                uow.insert(DownloadPolicy, sn=sn, requested_by=actor, updated_at=now, **values)
            else:
                uow.run(
                    _REQUEST_ROTATION, b_sn=sn, tmk_algorithm=tmk_algorithm, actor=actor, b_now=now
                )
            uow.audit(
                "tmk.rotation_requested",
                actor=actor,
                subject=sn,
                details={"tmk_algorithm": tmk_algorithm},
            )
        return self.overview(sn)

    def list_terminals(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        after_sn: str | None = None,
        limit: int = 100,
    ) -> list[TerminalSummary]:
        """Terminals in SN order after ``after_sn``, of ``status`` and ``model`` when given,
        at most ``limit``."""
        statement = select(*_SUMMARY_COLUMNS)
        if after_sn is not None:
            statement = statement.where(Terminal.sn > after_sn)
        if status is not None:
            statement = statement.where(Terminal.status == status)
        if model is not None:
            statement = statement.where(Terminal.model == model)
        statement = statement.order_by(Terminal.sn).limit(limit)
        rows = self._db.read(lambda reads: reads.all(statement))
        return [
            TerminalSummary(
                sn=row.sn,
                model=row.model,
                key_algorithm=row.key_algorithm,
                status=row.status,
                registered_by=row.registered_by,
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
            )
            for row in rows
        ]

    def overview(self, sn: str) -> TerminalOverview:
        """The terminal's registration, its active TMK and working keys (KCVs only)."""
        with self._db.reading() as reads:
            terminal = reads.one(_TERMINAL, b_sn=sn)
            if terminal is None:
                raise TmkUnknownTerminal(f"no terminal {sn[:64]!r}")
            policy = reads.one(_POLICY, b_sn=sn)
            tmk = reads.one(_ACTIVE_TMK, b_sn=sn)
            keys = reads.all(_ACTIVE_WORKING_KEYS, b_sn=sn)
            history = reads.scalar(_TMK_HISTORY, b_sn=sn)
        return TerminalOverview(
            sn=terminal.sn,
            model=terminal.model,
            key_algorithm=terminal.key_algorithm,
            status=terminal.status,
            registered_by=terminal.registered_by,
            created_at=as_utc(terminal.created_at),
            updated_at=as_utc(terminal.updated_at),
            tmk_algorithm=policy.tmk_algorithm if policy else self._default_algorithm.value,
            rotation_requested=bool(policy and policy.rotation_requested_at),
            active_tmk=_tmk_info(tmk) if tmk else None,
            working_keys=[
                WorkingKeyInfo(k.usage, k.algorithm, k.key_version, k.kcv_hex, as_utc(k.created_at))
                for k in keys
            ],
            tmk_history=int(history or 0),
        )

    @staticmethod
    def _locked(uow: UnitOfWork, sn: str) -> Any:
        terminal = uow.one(_TERMINAL_LOCKED, b_sn=sn)
        if terminal is None:
            raise TmkUnknownTerminal(f"no terminal {sn[:64]!r}")
        return terminal


def _tmk_info(row: Any) -> TmkInfo:
    return TmkInfo(
        algorithm=row.algorithm,
        kcv=row.kcv_hex,
        status=row.status,
        session_id=row.session_id,
        created_at=as_utc(row.created_at),
        activated_at=as_utc(row.activated_at) if row.activated_at else None,
        retired_at=as_utc(row.retired_at) if row.retired_at else None,
    )
