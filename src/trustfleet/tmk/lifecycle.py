"""What the TMK use cases share about a terminal's keys and sessions: the status checks,
retiring a terminal's TMK with its working keys, and ending its open download sessions.

Each runs inside the caller's unit of work, under the row locks the caller took, and
leaves the retired keys to be destroyed after the commit
(:meth:`~trustfleet.store.UnitOfWork.destroy_after_commit`), their rows marked
``destroyed_at`` then. A crash in between leaves rows that say retired or aborted but not
destroyed: :meth:`~trustfleet.tmk.downloads.Downloads.sweep` finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, or_, select, update

from trustfleet.keystore.base import KeyStore
from trustfleet.store import UnitOfWork
from trustfleet.tmk.errors import TmkTerminalRevoked, TmkTerminalSuspended, TmkUnknownTerminal
from trustfleet.tmk.models import DownloadSession, TerminalMasterKey, WorkingKey
from trustfleet.tmk.protocol import ServerSessionState, ServerStage

OPEN_STAGES = (ServerStage.CHALLENGED.value, ServerStage.DELIVERED.value)


def check_status(sn: str, status: str | None) -> None:
    """Only an active registered terminal may download and get keys (``status`` None: no
    such terminal)."""
    if status is None:
        raise TmkUnknownTerminal(f"no terminal {sn[:64]!r} is registered")
    if status == "suspended":
        raise TmkTerminalSuspended(f"terminal {sn} is suspended")
    if status == "revoked":
        raise TmkTerminalRevoked(f"terminal {sn} is revoked")


# -- retiring a TMK and its working keys ---------------------------------------------------

_RETIRE_TMK = (
    update(TerminalMasterKey)
    .where(TerminalMasterKey.active_sn == bindparam("b_sn"))
    .values(status="retired", active_sn=None, retired_at=bindparam("b_now"))
    .returning(TerminalMasterKey.id, TerminalMasterKey.key_handle, TerminalMasterKey.kcv_hex)
)
_RETIRE_WORKING_KEYS = (
    update(WorkingKey)
    .where(WorkingKey.tmk_id == bindparam("b_tmk"), WorkingKey.status == "active")
    .values(status="retired", active_slot=None, retired_at=bindparam("b_now"))
    .returning(WorkingKey.id, WorkingKey.key_handle)
)
MARK_TMK_DESTROYED = (
    update(TerminalMasterKey)
    .where(TerminalMasterKey.id == bindparam("b_id"), TerminalMasterKey.destroyed_at.is_(None))
    .values(destroyed_at=bindparam("b_now"))
)
MARK_WORKING_KEY_DESTROYED = (
    update(WorkingKey)
    .where(WorkingKey.id == bindparam("b_id"), WorkingKey.destroyed_at.is_(None))
    .values(destroyed_at=bindparam("b_now"))
)


@dataclass(frozen=True)
class RetiredTmk:
    kcv_hex: str
    working_keys: int


def retire_active_tmk(
    uow: UnitOfWork, keystore: KeyStore, sn: str, now: datetime
) -> RetiredTmk | None:
    """Retire the terminal's active TMK and its working keys (destroyed after commit); what
    was retired, or None when it had no active TMK."""
    row = uow.one(_RETIRE_TMK, b_sn=sn, b_now=now)
    if row is None:
        return None
    uow.destroy_after_commit(
        keystore, row.key_handle, mark=MARK_TMK_DESTROYED, b_id=row.id, b_now=now
    )
    keys = uow.all(_RETIRE_WORKING_KEYS, b_tmk=row.id, b_now=now)
    for key in keys:
        uow.destroy_after_commit(
            keystore, key.key_handle, mark=MARK_WORKING_KEY_DESTROYED, b_id=key.id, b_now=now
        )
    return RetiredTmk(row.kcv_hex, len(keys))


# -- ending download sessions ----------------------------------------------------------------

SESSION_COLUMNS = (
    DownloadSession.session_id,
    DownloadSession.sn,
    DownloadSession.state_json,
    DownloadSession.stage,
)
IS_OPEN = or_(*(DownloadSession.stage == stage for stage in OPEN_STAGES))
OPEN_SESSIONS = (
    select(*SESSION_COLUMNS)
    .where(DownloadSession.sn == bindparam("b_sn"), IS_OPEN)
    .with_for_update()
)
OPEN_SESSIONS_SKIP_LOCKED = OPEN_SESSIONS.with_for_update(skip_locked=True)
_ABORT_SESSION = (
    update(DownloadSession)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .values(
        state_json=bindparam("state_json"),
        stage=ServerStage.ABORTED.value,
        error_code=bindparam("error_code"),
        updated_at=bindparam("b_now"),
    )
)
_ABORT_PENDING_TMK = (
    update(TerminalMasterKey)
    .where(
        TerminalMasterKey.session_id == bindparam("b_sid"), TerminalMasterKey.status == "pending"
    )
    .values(status="aborted")
)
_MARK_SESSION_TMK_DESTROYED = (
    update(TerminalMasterKey)
    .where(
        TerminalMasterKey.session_id == bindparam("b_sid"),
        TerminalMasterKey.destroyed_at.is_(None),
    )
    .values(destroyed_at=bindparam("b_now"))
)


def abort_sessions(
    uow: UnitOfWork, keystore: KeyStore, rows: Sequence[Any], code: str, now: datetime
) -> list[ServerSessionState]:
    """End the open sessions among ``rows`` (:data:`SESSION_COLUMNS`, locked by the caller)
    with ``code``: a delivered TMK is marked aborted and destroyed after commit. The states
    of the sessions that were open."""
    ended = []
    for row in rows:
        if row.stage not in OPEN_STAGES:
            continue
        state = ServerSessionState.from_json(row.state_json)
        aborted = replace(state, stage=ServerStage.ABORTED)
        uow.run(
            _ABORT_SESSION,
            b_sid=row.session_id,
            state_json=aborted.to_json().decode(),
            error_code=code,
            b_now=now,
        )
        uow.run(_ABORT_PENDING_TMK, b_sid=row.session_id)
        if state.tmk_handle is not None:
            uow.destroy_after_commit(
                keystore,
                state.tmk_handle,
                mark=_MARK_SESSION_TMK_DESTROYED,
                b_sid=row.session_id,
                b_now=now,
            )
        ended.append(state)
    return ended


def abort_open_sessions(
    uow: UnitOfWork,
    keystore: KeyStore,
    sn: str,
    code: str,
    now: datetime,
    *,
    skip_locked: bool = False,
) -> list[ServerSessionState]:
    """End the terminal's open sessions (with ``skip_locked``, leave those another
    transaction is confirming right now to it); the states of those that ended."""
    rows = uow.all(OPEN_SESSIONS_SKIP_LOCKED if skip_locked else OPEN_SESSIONS, b_sn=sn)
    return abort_sessions(uow, keystore, rows, code, now)
