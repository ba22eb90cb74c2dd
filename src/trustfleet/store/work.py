"""The unit of work: all of one use case's database work, and the one way to do it.

A use case reads what it needs (:meth:`Database.reading`), calls the key store and the
crypto, then opens one :meth:`Database.work`: it locks the rows it depends on (``SELECT ...
FOR UPDATE``), checks again what it read, writes, records its audit record with
:meth:`UnitOfWork.audit`, and asks for the keys it retired to be destroyed with
:meth:`UnitOfWork.destroy_after_commit`. When the block ends the audit records are
appended (last, so the chain's lock is held for the shortest time) and written to the
audit devices, if any (a device that fails fails the unit of work;
:mod:`trustfleet.store.audit_devices`), the transaction commits, and only then are the
keys destroyed and their rows marked. Any error rolls everything back: nothing is
half-written, no audit record claims what did not happen.

Statements are SQLAlchemy Core statements against the models. Build the ones a busy path
runs once, at module level, with ``bindparam`` placeholders, and pass the values as keyword
arguments; they are compiled once and run on the database driver (see
:mod:`trustfleet.store.driver` for why and how). A statement built per call (an ``IN``
list of values, a filter chosen at run time) works too, compiled when it is used.

A unit of work opened while another is open on the same database, in the same thread or
task, joins it: its statements, audit records and after-commit actions belong to the
outer one, and an error that leaves it dooms the outer one even if caught. That is how the
soft key store makes a key inside the use case's transaction: the key exists only if the
use case commits.

On SQLite a unit of work holds the database's write lock from its first statement to its
commit (``BEGIN IMMEDIATE``); keep it short, and never wait for anything else inside it.
Bulk work commits in bounded batches, one unit of work each, so that no writer holds the
lock for long. Reads run in autocommit, each statement its own snapshot, and never wait for
a writer. A unit of work waits its turn for the lock (or, on PostgreSQL, for a row lock or
a pooled connection) up to :data:`~trustfleet.store.engine.WRITE_WAIT_SECONDS`, then fails
with :class:`DatabaseBusy` (503 ``database-busy``, nothing written).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol, TypeVar

from sqlalchemy import Engine, Insert, Table, bindparam, insert
from sqlalchemy.sql.expression import ClauseElement

from trustfleet.errors import KeyNotFound
from trustfleet.store import audit, driver
from trustfleet.store.audit_devices import AuditTrail
from trustfleet.store.driver import (
    ConnectionLost,
    DatabaseBusy,
    IntegrityViolation,
    WriteLockBusy,
    without_waiting,
)

__all__ = [
    "ConnectionLost",
    "Database",
    "DatabaseBusy",
    "IntegrityViolation",
    "Reads",
    "UnitOfWork",
    "WriteLockBusy",
]

T = TypeVar("T")
log = logging.getLogger("trustfleet.store")

_PENDING = "trustfleet.store.work.pending"


class Destroys(Protocol):
    """What destroys a key by its handle (a key store)."""

    def destroy(self, handle: str) -> None: ...


@dataclass
class _Pending:
    """What the outermost unit of work does at its end: audit records before the commit,
    key destruction and other actions after it."""

    audit: list[dict[str, Any]] = field(default_factory=list)
    destroy: list[tuple[Destroys, str]] = field(default_factory=list)
    marks: list[tuple[ClauseElement, dict[str, Any]]] = field(default_factory=list)
    actions: list[Callable[[], None]] = field(default_factory=list)
    checkpoint: bool = False


class Reads:
    """Statements that read: :meth:`one`, :meth:`all`, :meth:`scalar`. Rows are named
    tuples of the selected columns (``row.sn``, ``row.status``)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: driver.RawConnection) -> None:
        self._connection = connection

    @property
    def dialect_name(self) -> str:
        return self._connection.dialect_name

    def one(self, statement: ClauseElement, /, **params: Any) -> Any:
        """The first row, or None."""
        return self._connection.one(statement, params)

    def all(self, statement: ClauseElement, /, **params: Any) -> list[Any]:
        return self._connection.all(statement, params)

    def scalar(self, statement: ClauseElement, /, **params: Any) -> Any:
        """The first column of the first row, or None."""
        return self._connection.scalar(statement, params)


class UnitOfWork(Reads):
    """One write transaction (see the module docstring)."""

    __slots__ = ("_pending",)

    def __init__(self, connection: driver.RawConnection, pending: _Pending) -> None:
        super().__init__(connection)
        self._pending = pending

    @property
    def info(self) -> dict[str, Any]:
        """Scratch space of this transaction, shared with the units of work that join it
        (the soft key store keeps there the keys it made, so they are not read back)."""
        return self._connection.info

    def run(self, statement: ClauseElement, /, **params: Any) -> int:
        """An insert, update or delete; the number of rows it touched. A constraint that
        refuses it raises :class:`IntegrityViolation` (the transaction is then doomed)."""
        return self._connection.run(statement, params)

    def insert(self, table: Table | type[Any], /, **values: Any) -> None:
        """Insert one row of ``table`` (a table or a model class) with these columns."""
        self._connection.run(_insert_statement(table, tuple(values)), values)

    def insert_many(self, table: Table | type[Any], rows: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`insert_rows` for rows given as mappings that all name the same columns."""
        if rows:
            columns = tuple(rows[0])
            self.insert_rows(table, columns, [tuple(row[name] for name in columns) for row in rows])

    def insert_rows(
        self,
        table: Table | type[Any],
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """Insert many new rows, each a tuple of ``columns``' values, by the database's bulk
        path (``COPY`` on PostgreSQL, one prepared ``executemany`` on SQLite): the way to
        write tens of thousands of rows per unit of work. A row that breaks a constraint
        fails the whole call (IntegrityViolation)."""
        target = table if isinstance(table, Table) else table.__table__
        self._connection.copy_rows(target, columns, rows)

    def audit(
        self,
        action: str,
        *,
        actor: str,
        subject: str = "",
        outcome: str = "success",
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """The audit record of what this unit of work does; appended to the chain when the
        block ends, so it commits with the work or not at all. ``at`` defaults to the time
        of the append (a use case with an injected clock passes its own). Never put key
        material, PINs or secrets in ``details``."""
        record = {"action": action, "actor": actor, "subject": subject, "outcome": outcome}
        self._pending.audit.append({**record, "details": dict(details or {}), "at": at})

    def destroy_after_commit(
        self,
        keys: Destroys,
        handle: str,
        *,
        mark: ClauseElement | None = None,
        **params: Any,
    ) -> None:
        """Destroy the key ``handle`` once this work has committed (its rows already say it
        is retired), then run ``mark`` (with ``params``) to record it, e.g. set the row's
        ``destroyed_at``. A key that is already gone is fine. Should the process stop in
        between, the rows still show a retired key not marked destroyed: the domain's
        sweep finds and destroys it."""
        self._pending.destroy.append((keys, handle))
        if mark is not None:
            self._pending.marks.append((mark, params))

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once this work has committed (never if it rolls back)."""
        self._pending.actions.append(action)

    def checkpoint_after_commit(self) -> None:
        """Once this work has committed, move the SQLite WAL into the database file and
        truncate it (nothing on PostgreSQL): a key store that empties a destroyed key's
        row asks for it, so the wrapped copy in the WAL's older frames goes too (secure
        delete zeroes the one in the page). Asked several times, or by the key
        destructions of :meth:`destroy_after_commit`, it is asked once, after them all,
        and runs on a thread of its own moments later (:meth:`Database.wait_for_checkpoint`
        waits for it). Best effort: a reader still on an older snapshot can keep it from
        finishing (it is logged); the next checkpoint then does it."""
        self._pending.checkpoint = True


class Database:
    """One database, shared by every use case of a process."""

    def __init__(self, engine: Engine, trail: AuditTrail | None = None) -> None:
        self.engine = engine
        self._reads = driver.read_engine(engine)
        #: the audit devices and checkpoints (:mod:`trustfleet.store.audit_devices`)
        self.trail = trail
        self._checkpointer = _Checkpointer(self)

    @property
    def dialect_name(self) -> str:
        return str(self.engine.dialect.name)

    @contextmanager
    def reading(self) -> Iterator[Reads]:
        """Reads outside any transaction, each statement its own snapshot (a use case that
        needs several reads to agree makes them under lock in its unit of work). Inside a
        unit of work of this thread or task, the reads run in it and see its writes."""
        with driver.raw_reading(self._reads) as connection:
            yield Reads(connection)

    def read(self, use: Callable[[Reads], T]) -> T:
        """``use`` in :meth:`reading`, once more on a fresh connection if the server had
        dropped the kept one (reads are safe to repeat)."""
        return driver.read(self._reads, lambda connection: use(Reads(connection)))

    @contextmanager
    def work(self, *, wait: bool = True) -> Iterator[UnitOfWork]:
        """One use case's write transaction (see the module docstring).

        ``wait=False`` is for an idempotent write worth making only if it costs no wait (a
        token's last-use refresh): it raises :class:`DatabaseBusy` at once when another
        writer holds SQLite's lock, and waits at most 100 ms for a PostgreSQL row lock."""
        outermost = driver.transaction_info(self.engine) is None
        trail = self.trail if self.trail is not None and self.trail.active else None
        on_devices: list[dict[str, Any]] = []
        try:
            with driver.raw_transaction(self.engine, wait=wait) as connection:
                pending = connection.info.get(_PENDING)
                if pending is None:  # the outermost unit of work (a joined one finds it)
                    pending = connection.info[_PENDING] = _Pending()
                yield UnitOfWork(connection, pending)
                if outermost:
                    records = [audit.append(connection, **record) for record in pending.audit]
                    if trail is not None and records:
                        lines = trail.seal(connection, records)
                        if lines:  # before the commit: a device that fails rolls back
                            trail.write(lines, records)
                            on_devices = records
        except BaseException:
            if on_devices and trail is not None:  # the commit failed after the devices
                trail.void(on_devices)
            raise
        if outermost:
            self._after_commit(pending)

    @contextmanager
    def without_waiting(self) -> Iterator[None]:
        """Units of work of the block never wait for SQLite's write lock until one has
        committed: one that finds it taken raises :class:`WriteLockBusy` before it writes
        anything, so the caller may run the whole block again where waiting is harmless
        (:func:`trustfleet.server.deps.run_database_work` runs it in a thread)."""
        with without_waiting():
            yield

    def yield_to_writers(self) -> None:
        """Call between the batches of a long job whose next batch is ready at once (its
        preparation overlaps the commit): on SQLite it pauses about 10 ms so that a request
        waiting for the write lock gets it first; on PostgreSQL it does nothing."""
        driver.yield_write_lock(self.engine)

    def open_work_info(self) -> dict[str, Any] | None:
        """The :attr:`UnitOfWork.info` of the unit of work open in this thread or task on
        this database, or None."""
        return driver.transaction_info(self.engine)

    def on_commit(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` with a committed unit of work's ``info`` (its audit records
        are listed under :data:`trustfleet.store.audit.PENDING_INFO_KEY`)."""
        driver.on_commit(self.engine, listener)

    def _after_commit(self, pending: _Pending) -> None:
        outer = _deferred_checkpoint.get()
        deferred = outer[1] if outer is not None and outer[0] is self else None
        if deferred is not None:  # inside another's after-commit: checkpoint once, there
            deferred.checkpoint |= pending.checkpoint
            pending.checkpoint = False
        else:
            token = _deferred_checkpoint.set((self, pending))
        try:
            for keys, handle in pending.destroy:
                try:
                    with contextlib.suppress(KeyNotFound):
                        keys.destroy(handle)
                except Exception:  # committed already: the domain's sweep destroys it later
                    log.exception("could not destroy a retired key after commit")
            if pending.marks:
                with self.work() as marking:
                    for statement, params in pending.marks:
                        marking.run(statement, **params)
            for action in pending.actions:
                action()
        finally:
            if deferred is None:
                _deferred_checkpoint.reset(token)
        if pending.checkpoint:
            self._checkpointer.request()

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait for the checkpoint asked for by the units of work committed so far (see
        :meth:`UnitOfWork.checkpoint_after_commit`); True if it completed."""
        return self._checkpointer.wait(timeout)

    def checkpoint(self) -> bool:
        """SQLite: copy the WAL into the database file and truncate it now; True if done
        (see :meth:`UnitOfWork.checkpoint_after_commit`). Other databases: True."""
        try:
            done = driver.sqlite_checkpoint(self.engine)
        except Exception:  # committed already; the next checkpoint does it
            log.exception("the WAL checkpoint after destroying keys failed")
            return False
        if not done:
            log.warning(
                "the WAL checkpoint after destroying keys could not finish (a reader or"
                " writer was busy): their wrapped copies stay in the WAL until the next one"
            )
        return done


#: seconds a checkpoint after key destruction waits for more destructions to share it
CHECKPOINT_DELAY = 0.1


class _Checkpointer:
    """Runs :meth:`Database.checkpoint` on a thread of its own, soon after it is asked,
    so the request that destroyed a key does not wait for the checkpoint's fsyncs (about
    17 ms on a disk, where the destruction itself takes 0.2 ms). It waits
    :data:`CHECKPOINT_DELAY` first, and requests made while one is queued share it (one
    made while it runs queues the next): a stream of destructions (terminals downloading
    new TMKs) checkpoints a few times a second, not once per destruction, since each holds
    the write lock while it syncs."""

    _executor: ClassVar[ThreadPoolExecutor | None] = None
    _executor_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._queued: Future[bool] | None = None
        self._last: Future[bool] | None = None

    @classmethod
    def _pool(cls) -> ThreadPoolExecutor:
        with cls._executor_lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(1, thread_name_prefix="trustfleet-checkpoint")
            return cls._executor

    def request(self) -> None:
        if self._db.dialect_name != "sqlite":
            return
        with self._lock:
            if self._queued is None:
                self._queued = self._last = self._pool().submit(self._run)

    def _run(self) -> bool:
        time.sleep(CHECKPOINT_DELAY)
        with self._lock:
            self._queued = None  # a request from now on needs another checkpoint
        return self._db.checkpoint()

    def wait(self, timeout: float | None) -> bool:
        with self._lock:
            last = self._last
        return True if last is None else last.result(timeout)


#: the pending work whose after-commit actions are running in this thread or task: units
#: of work they open add their checkpoint to it, so it runs once, after them all
_deferred_checkpoint: ContextVar[tuple[Database, _Pending] | None] = ContextVar(
    "trustfleet_deferred_checkpoint", default=None
)

_inserts: dict[tuple[Any, tuple[str, ...]], Insert] = {}


def _insert_statement(table: Table | type[Any], columns: tuple[str, ...]) -> Insert:
    """An insert of these columns into ``table``, made once per table and column list
    (there are as many as there are call sites)."""
    key = (table, columns)
    statement = _inserts.get(key)
    if statement is None:
        target = table if isinstance(table, Table) else table.__table__
        statement = insert(target).values({name: bindparam(name) for name in columns})
        _inserts[key] = statement
    return statement
