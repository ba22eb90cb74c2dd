"""The unit of work's engine room (:mod:`trustfleet.store.work` is the API; nothing else
imports this module): SQLAlchemy Core statements compiled once, run on the DBAPI connection.

A Core ``connection.execute`` and a pooled ORM transaction cost several times what the
same work costs on the driver, and more than a one-row statement itself (the figures are in
``bench/RESULTS.md``), and a device step runs several statements.

The statements are still written in Core against the models, compiled once per dialect
(:class:`Prepared`); values pass through the dialect's own bind and result processors, so
what is written here reads back through the ORM unchanged (SQLite's datetimes as text, say).

Transactions follow :mod:`trustfleet.store.engine`'s SQLite rule: :func:`raw_transaction`
takes the write lock at ``BEGIN IMMEDIATE``; :func:`raw_reading` runs statements in autocommit, each
its own snapshot, which in WAL mode never waits for a writer. Reads go through
:func:`read_engine`: on PostgreSQL the shared engine pings each connection at checkout and
wraps each statement in BEGIN/ROLLBACK, three round trips around a one-row select, so reads
use a companion engine on the same URL in autocommit and without the ping, disposed with
the shared one.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine, Insert, Table, bindparam, create_engine, event, insert
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ColumnElement

from trustfleet.errors import InvalidInput, TrustfleetError
from trustfleet.store import engine as store_engine

__all__ = [
    "ConnectionLost",
    "DatabaseBusy",
    "IntegrityViolation",
    "Prepared",
    "RawConnection",
    "RawTransactionDoomed",
    "WriteLockBusy",
    "insert_columns",
    "on_commit",
    "raw_reading",
    "raw_transaction",
    "read",
    "read_engine",
    "without_waiting",
]

Processor = Callable[[Any], Any]
T = TypeVar("T")


def insert_columns(*columns: ColumnElement[Any] | QueryableAttribute[Any]) -> Insert:
    """An insert into the columns' table binding each column by its key. A raw insert names
    its columns: compiled without values, an insert would bind every column of the table
    (NULL ids and defaults included)."""
    table = columns[0].expression.table  # a mapped attribute's column, or the column itself
    return insert(table).values({column: bindparam(column.key) for column in columns})


class IntegrityViolation(Exception):
    """A constraint refused a raw statement (the driver's IntegrityError, any driver)."""


class ConnectionLost(Exception):
    """The database dropped the connection (a restart, an idle timeout); it was discarded."""


class DatabaseBusy(TrustfleetError):
    """A write waited its turn for :data:`~trustfleet.store.engine.WRITE_WAIT_SECONDS` (for
    SQLite's write lock, a PostgreSQL row lock or a pooled connection) and gave up. Nothing
    was written; the request may be sent again (503 with ``Retry-After``)."""

    code = "database-busy"
    status = 503
    title = "The database is busy with other writes; retry shortly"
    #: seconds a client should wait before it retries (the ``Retry-After`` header)
    retry_after = 1


class WriteLockBusy(DatabaseBusy):
    """In a :func:`without_waiting` block, SQLite's write lock was taken when a transaction
    began: nothing was written, and the caller runs the work again where it may wait."""


# SQLite's SQLITE_BUSY and SQLITE_LOCKED (primary codes); PostgreSQL's lock_not_available
_SQLITE_BUSY_CODES = frozenset({5, 6})
_POSTGRES_LOCK_NOT_AVAILABLE = "55P03"


def _is_busy(exc: BaseException) -> bool:
    """Whether a driver error says a lock could not be had in time (not a broken query)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_BUSY_CODES
    return getattr(exc, "sqlstate", None) == _POSTGRES_LOCK_NOT_AVAILABLE


def _busy() -> DatabaseBusy:
    return DatabaseBusy(
        f"the database stayed busy with other writes for {store_engine.WRITE_WAIT_SECONDS} s;"
        " nothing was"
        " written, retry shortly"
    )


class NulInText(InvalidInput):
    """A statement's text value holds a NUL character, which PostgreSQL can neither store
    nor compare (psycopg refuses to send it): the caller's input, not a server failure."""

    code = "nul-in-text"
    title = "Text cannot contain a NUL character"


class Prepared:
    """One Core statement compiled for one dialect, with its parameter order, literal
    values and the column types' processors resolved once."""

    __slots__ = ("_positional", "_processed", "_results", "_row", "_slots", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler), "a DML or SELECT statement"
        expanding = {compiled.bind_names[bind]: bind for bind in compiled.post_compile_params}
        if expanding:  # an IN list of literal values: one placeholder per value
            rendered = {"render_postcompile": True}
            compiled = statement.compile(dialect=dialect, compile_kwargs=rendered)
            assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        defaults = compiled.params
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        self._positional = bool(compiled.positional)
        order = compiled.positiontup or () if self._positional else list(defaults)
        # (name, literal value, required, the type's bind processor) in the SQL's order
        self._slots = tuple(
            (name, defaults.get(name), *_bind_facts(by_name, expanding, name, dialect))
            for name in order
        )
        columns = list(getattr(statement, "exported_columns", ()))
        self._results: tuple[Processor | None, ...] = tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        )
        self._processed = any(process is not None for process in self._results)
        keys = [getattr(c, "key", None) or f"c{i}" for i, c in enumerate(columns)]
        self._row: Any = namedtuple("Row", keys, rename=True) if keys else None

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        bound = []
        for name, default, required, process in self._slots:
            if name in values:
                value = values[name]
            elif required:
                raise TypeError(f"missing statement parameter: {name}")
            else:
                value = default
            bound.append(value if process is None else process(value))
        if self._positional:
            return tuple(bound)
        return {slot[0]: value for slot, value in zip(self._slots, bound, strict=True)}

    def row(self, raw: tuple[Any, ...]) -> Any:
        assert self._row is not None, "the statement selects no columns"
        if not self._processed:
            return self._row._make(raw)
        return self._row._make(
            value if process is None else process(value)
            for value, process in zip(raw, self._results, strict=True)
        )


def _bind_facts(
    by_name: Mapping[str, Any], expanding: Mapping[str, Any], name: str, dialect: Dialect
) -> tuple[bool, Processor | None]:
    """Whether a parameter is required, and its type's bind processor; a value of an
    expanded IN list (``<name>_<n>``) takes its list's type."""
    bind = by_name.get(name)
    if bind is None:
        bind = expanding[name.rsplit("_", 1)[0]]
        return False, bind.type.dialect_impl(dialect).bind_processor(dialect)
    return bool(bind.required), bind.type.dialect_impl(dialect).bind_processor(dialect)


class RawConnection:
    """A DBAPI connection checked out for one use case. Statements are compiled once and
    cached by identity: build them once, at module level, never per call."""

    __slots__ = ("_dbapi", "_dialect", "_prepared", "info")

    def __init__(self, dbapi_connection: Any, dialect: Dialect) -> None:
        self._dbapi = dbapi_connection
        self._dialect = dialect
        self._prepared = _prepared_cache(dialect)
        #: what the transaction's statements leave for :func:`on_commit` listeners
        self.info: dict[str, Any] = {}

    @property
    def dialect_name(self) -> str:
        return str(self._dialect.name)

    def _run(self, statement: ClauseElement, values: Mapping[str, Any]) -> tuple[Any, Prepared]:
        cached = self._prepared.get(id(statement))
        if cached is not None and cached[0] is statement:
            prepared = cached[1]
        else:
            prepared = self._prepare(statement)
        cursor = self._dbapi.cursor()
        try:
            cursor.execute(prepared.sql, prepared.parameters(values))
        except self._dialect.loaded_dbapi.IntegrityError as exc:
            cursor.close()
            raise IntegrityViolation(str(exc)) from exc
        except self._dialect.loaded_dbapi.DataError as exc:
            cursor.close()
            if "NUL" in str(exc):
                raise NulInText("a text value contains a NUL character") from exc
            raise
        except self._dialect.loaded_dbapi.Error as exc:
            if self._dialect.is_disconnect(exc, self._dbapi, cursor):
                raise ConnectionLost(str(exc)) from exc
            cursor.close()
            if _is_busy(exc):
                raise _busy() from exc
            raise
        except BaseException:
            cursor.close()
            raise
        return cursor, prepared

    def _prepare(self, statement: ClauseElement) -> Prepared:
        prepared = Prepared(statement, self._dialect)
        with _cache_lock:
            # the entry keeps its statement alive, so no other statement takes its id while
            # it is cached; the oldest entries go first once the cache is full
            self._prepared[id(statement)] = (statement, prepared)
            while len(self._prepared) > _PREPARED_PER_DIALECT:
                del self._prepared[next(iter(self._prepared))]
        return prepared

    def one(self, statement: ClauseElement, values: Mapping[str, Any] | None = None) -> Any:
        """The first row (a named tuple), or None."""
        cursor, prepared = self._run(statement, values or {})
        try:
            raw = cursor.fetchone()
        finally:
            cursor.close()
        return None if raw is None else prepared.row(raw)

    def all(self, statement: ClauseElement, values: Mapping[str, Any] | None = None) -> list[Any]:
        cursor, prepared = self._run(statement, values or {})
        try:
            return [prepared.row(raw) for raw in cursor.fetchall()]
        finally:
            cursor.close()

    def scalar(self, statement: ClauseElement, values: Mapping[str, Any] | None = None) -> Any:
        row = self.one(statement, values)
        return None if row is None else row[0]

    def run(self, statement: ClauseElement, values: Mapping[str, Any] | None = None) -> int:
        """Execute a statement that returns no rows; its row count."""
        cursor, _ = self._run(statement, values or {})
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def copy_rows(
        self, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Insert rows given as tuples in ``columns``' order by the database's bulk path:
        ``COPY ... FROM STDIN`` on PostgreSQL, ``executemany`` of one prepared insert on
        SQLite (the columns' bind processors applied column by column)."""
        if not rows:
            return
        quote = self._dialect.identifier_preparer
        names = ", ".join(quote.quote(name) for name in columns)
        target = quote.format_table(table)
        cursor = self._dbapi.cursor()
        try:
            if self._dialect.name == "postgresql":
                with cursor.copy(f"COPY {target} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                return
            processors = [
                (index, process)
                for index, name in enumerate(columns)
                if (
                    process := table.c[name]
                    .type.dialect_impl(self._dialect)
                    .bind_processor(self._dialect)
                )
            ]
            if processors:  # column by column: most columns need no processing
                cells = [list(row) for row in rows]
                for index, process in processors:
                    last: Any = object()
                    done: Any = None
                    for cell in cells:
                        value = cell[index]
                        if value is not last:  # a value every row shares is processed once
                            last, done = value, process(value)
                        cell[index] = done
                rows = cells
            marks = ", ".join("?" * len(columns))
            cursor.executemany(f"INSERT INTO {target} ({names}) VALUES ({marks})", rows)  # noqa: S608
        except self._dialect.loaded_dbapi.IntegrityError as exc:
            raise IntegrityViolation(str(exc)) from exc
        except self._dialect.loaded_dbapi.Error as exc:
            if self._dialect.is_disconnect(exc, self._dbapi, cursor):
                raise ConnectionLost(str(exc)) from exc
            if _is_busy(exc):
                raise _busy() from exc
            raise
        finally:
            cursor.close()


_PreparedCache = dict[int, tuple[ClauseElement, Prepared]]
_caches: weakref.WeakKeyDictionary[Dialect, _PreparedCache] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()
#: statements kept compiled per dialect: module-level ones are compiled once; statements
#: built per call (an IN list of values, a filter) pass through
_PREPARED_PER_DIALECT = 2048


def _prepared_cache(dialect: Dialect) -> _PreparedCache:
    cache = _caches.get(dialect)
    if cache is None:
        with _cache_lock:
            cache = _caches.setdefault(dialect, {})
    return cache


_READ_POOL_SIZE = 5
_READ_MAX_OVERFLOW = 15
_companions: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def read_engine(engine: Engine) -> Engine:
    """The engine for hot-path reads of ``engine``'s database (see the module docstring),
    made once per engine."""
    companion = _companions.get(engine)
    if companion is not None:
        return companion
    with _cache_lock:
        companion = _companions.get(engine)
        if companion is None:
            companion = _make_read_engine(engine)
            _companions[engine] = companion
        return companion


def _make_read_engine(engine: Engine) -> Engine:
    if engine.dialect.name != "postgresql":
        # SQLite: the same engine, so reads and writes share the kept connections (see
        # _Idle): a connection's page cache survives its own writes, not another's
        return engine
    companion = create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=False,
        pool_size=_READ_POOL_SIZE,
        max_overflow=_READ_MAX_OVERFLOW,
    )
    event.listen(engine, "engine_disposed", lambda _: companion.dispose())
    return companion


CommitListener = Callable[[dict[str, Any]], None]
_commit_listeners: weakref.WeakKeyDictionary[Engine, list[CommitListener]] = (
    weakref.WeakKeyDictionary()
)


def on_commit(engine: Engine, listener: CommitListener) -> None:
    """Call ``listener`` with the connection's ``info`` after each :func:`raw_transaction`
    on ``engine`` commits (the ORM's ``after_commit``, for raw transactions)."""
    with _cache_lock:
        _commit_listeners.setdefault(engine, []).append(listener)


class _Idle:
    """DBAPI connections of one engine kept for reuse, without the pool's per-checkout
    bookkeeping (events, weakref finalisers, reset), which costs more than the statements
    of a hot-path read. Connections are made by the engine's pool (so its connect events
    run: SQLite's pragmas) and then detached from it."""

    def __init__(self, engine: Engine, size: int) -> None:
        self._engine = engine
        self._size = size
        self._idle: list[Any] = []
        self._generation = 0

    def acquire(self) -> tuple[Any, int]:
        try:
            return self._idle.pop(), self._generation
        except IndexError:
            pass
        pooled = _checkout(self._engine)
        driver = pooled.driver_connection
        pooled.detach()
        return driver, self._generation

    def release(self, driver: Any, generation: int) -> None:
        try:
            if _is_sqlite(self._engine) and driver.in_transaction:
                driver.rollback()
        except self._engine.dialect.loaded_dbapi.Error:
            self.discard(driver)  # unusable: never hand it out again
            return
        if generation == self._generation and len(self._idle) < self._size:
            self._idle.append(driver)
        else:
            driver.close()

    @staticmethod
    def discard(driver: Any) -> None:
        with contextlib.suppress(Exception):
            driver.close()

    def dispose(self) -> None:
        self._generation += 1
        while self._idle:
            self.discard(self._idle.pop())


_IDLE_CONNECTIONS = 32
_idle_by_engine: weakref.WeakKeyDictionary[Engine, _Idle] = weakref.WeakKeyDictionary()


def _idle(engine: Engine) -> _Idle:
    idle = _idle_by_engine.get(engine)
    if idle is None:
        with _cache_lock:
            idle = _idle_by_engine.get(engine)
            if idle is None:
                idle = _idle_by_engine[engine] = _Idle(engine, _IDLE_CONNECTIONS)
                event.listen(engine, "engine_disposed", lambda _: idle.dispose())
    return idle


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class RawTransactionDoomed(RuntimeError):
    """An error left a joined :func:`raw_transaction` and was caught: the outer one must
    not commit what is left half-done."""


@dataclass
class _Ambient:
    """The raw transaction open in this thread or task, and the engines it serves."""

    engines: tuple[Engine, ...]
    connection: RawConnection
    doomed: bool = False


_ambient: ContextVar[_Ambient | None] = ContextVar("trustfleet_raw_transaction", default=None)


@dataclass
class _Attempt:
    """A :func:`without_waiting` block: whether a transaction of it has committed yet."""

    committed: bool = False


_attempt: ContextVar[_Attempt | None] = ContextVar("trustfleet_without_waiting", default=None)


@contextmanager
def without_waiting() -> Iterator[None]:
    """Run the block's SQLite write transactions without waiting for the write lock until
    one of them commits: one that finds the lock taken raises :class:`WriteLockBusy` at its
    ``BEGIN``, before it wrote anything. Once one has committed, the later ones wait as
    usual (the block is then no longer safe to run again). For work run on the event loop,
    which must never wait for the database: its caller runs the work again in a thread,
    where it waits its turn."""
    token = _attempt.set(_Attempt())
    try:
        yield
    finally:
        _attempt.reset(token)


def _joined(engine: Engine) -> _Ambient | None:
    ambient = _ambient.get()
    if ambient is not None and any(engine is served for served in ambient.engines):
        return ambient
    return None


def transaction_info(engine: Engine) -> dict[str, Any] | None:
    """The ``info`` of the :func:`raw_transaction` this thread or task has open on
    ``engine``'s database, or None: what its statements wrote so far, for code that would
    otherwise read it back."""
    ambient = _joined(engine)
    return None if ambient is None else ambient.connection.info


@contextmanager
def raw_reading(engine: Engine) -> Iterator[RawConnection]:
    """Reads on a kept connection of ``engine`` (a :func:`read_engine`). Each statement
    sees the database as of its start, as in autocommit: a use case that needs several
    statements to agree reads them under lock in its write transaction instead. (A BEGIN
    and ROLLBACK around them would cost more than a one-row select.)

    Inside a :func:`raw_transaction` on the same database the reads run in it, and so see
    its own writes."""
    ambient = _joined(engine)
    if ambient is not None:
        yield ambient.connection
        return
    idle = _idle(engine)
    driver, generation = idle.acquire()
    try:
        yield RawConnection(driver, engine.dialect)
    except ConnectionLost:
        idle.discard(driver)
        raise
    except BaseException:
        idle.release(driver, generation)
        raise
    idle.release(driver, generation)


def read(engine: Engine, use: Callable[[RawConnection], T]) -> T:
    """``use`` in a :func:`raw_reading`; once more on a fresh connection if the pooled one
    had been dropped by the server (reads are safe to repeat)."""
    try:
        with raw_reading(engine) as connection:
            return use(connection)
    except ConnectionLost:
        if _joined(engine) is not None:
            raise  # the transaction is lost with it: nothing to repeat here
    with raw_reading(engine) as connection:
        return use(connection)


@contextmanager
def raw_transaction(engine: Engine, *, wait: bool = True) -> Iterator[RawConnection]:
    """One write transaction: committed when the block ends, rolled back on any error.
    On SQLite it holds the write lock from the start (``BEGIN IMMEDIATE``) and runs on a
    kept connection; on PostgreSQL it checks a connection out of the engine's pool, whose
    ping finds connections the server dropped before anything is written.

    A raw transaction opened inside another on the same engine, in the same thread or
    task, joins it: its statements commit or roll back with the outer one's. That is how
    a use case makes a key in the soft key store (which writes to this database) in its
    own transaction. An error that leaves the inner block dooms the outer transaction:
    committing it raises :class:`RawTransactionDoomed` even if the error was caught.

    Without ``wait`` the transaction waits for no other writer (SQLite: :class:`DatabaseBusy`
    at once if the write lock is taken; PostgreSQL: a row lock is waited for at most
    :data:`NO_WAIT_LOCK_TIMEOUT`), and its commit does not end a :func:`without_waiting`
    attempt: for an idempotent refresh that may be skipped (a token's last use)."""
    ambient = _joined(engine)
    if ambient is not None:
        try:
            yield ambient.connection
        except BaseException:
            ambient.doomed = True
            raise
        return
    opened = _pooled_transaction if not _is_sqlite(engine) else _sqlite_transaction
    with opened(engine, wait) as connection:
        ambient = _Ambient((engine, read_engine(engine)), connection)
        token = _ambient.set(ambient)
        try:
            yield connection
        finally:
            _ambient.reset(token)
        if ambient.doomed:
            raise RawTransactionDoomed("a joined transaction failed; rolled back")


_NO_WAIT = "PRAGMA busy_timeout=0"
#: how long a transaction opened without ``wait`` waits for a PostgreSQL row lock
NO_WAIT_LOCK_TIMEOUT = "100ms"
#: the pauses between tries for SQLite's write lock: from 1 ms, doubling, to 8 ms at most
_FIRST_PAUSE, _LONGEST_PAUSE = 0.001, 0.008


def _sqlite_begin(driver: Any, wait: bool) -> None:
    """``BEGIN IMMEDIATE``: waiting for the write lock up to
    :data:`~trustfleet.store.engine.WRITE_WAIT_SECONDS` (then :class:`DatabaseBusy`), or
    (no ``wait``) not at all (:class:`WriteLockBusy`).

    The waiting is ours, not SQLite's busy handler's: that one sleeps up to 100 ms between
    tries, so a writer that commits a batch and begins its next one a little later (a
    bulk import) can keep a waiting request out for seconds. This one tries every few
    milliseconds (the sleep releases the GIL)."""
    driver.execute(_NO_WAIT)
    try:
        if _try_begin(driver):
            return
        if not wait:
            raise WriteLockBusy("another write holds the database's write lock")
        deadline = time.monotonic() + store_engine.WRITE_WAIT_SECONDS
        pause = _FIRST_PAUSE
        while time.monotonic() < deadline:
            time.sleep(pause)
            if _try_begin(driver):
                return
            pause = min(2 * pause, _LONGEST_PAUSE)
        raise _busy()
    finally:  # the busy timeout of other statements (which rarely wait in WAL mode)
        driver.execute(f"PRAGMA busy_timeout={store_engine.WRITE_WAIT_SECONDS * 1000}")


def yield_write_lock(engine: Engine) -> None:
    """Between two write transactions of a long job on SQLite: pause a little longer than a
    waiting writer's longest pause, so that one gets the write lock before the job's next
    transaction takes it again (a job that commits and begins at once would keep it out).
    Nothing on PostgreSQL, whose locks are per row."""
    if _is_sqlite(engine):
        time.sleep(_LONGEST_PAUSE + 0.002)


def _try_begin(driver: Any) -> bool:
    """``BEGIN IMMEDIATE`` if the write lock is free (false if another writer has it)."""
    try:
        driver.execute("BEGIN IMMEDIATE")
    except driver.OperationalError as exc:  # the sqlite3 module's own error classes
        if _is_busy(exc):
            return False
        raise
    return True


@contextmanager
def _sqlite_transaction(engine: Engine, wait: bool) -> Iterator[RawConnection]:
    attempt = _attempt.get()
    trying = attempt is not None and not attempt.committed
    idle = _idle(engine)
    driver, generation = idle.acquire()
    connection = RawConnection(driver, engine.dialect)
    try:
        _sqlite_begin(driver, wait and not trying)
        yield connection
        try:
            driver.commit()
        except driver.OperationalError as exc:
            if _is_busy(exc):
                raise _busy() from exc
            raise
    except BaseException:
        idle.release(driver, generation)  # rolls back
        raise
    idle.release(driver, generation)
    if attempt is not None and wait:
        attempt.committed = True
    _committed(engine, connection)


def sqlite_checkpoint(engine: Engine) -> bool:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` on a kept connection of a SQLite ``engine``:
    every page in the WAL copied into the database file and the WAL truncated to zero
    bytes. True if it completed; False if a reader still on an older snapshot (or a
    writer that outlasted the busy timeout) kept it from finishing, in which case the WAL
    keeps what it held until a later checkpoint. Not SQLite: nothing to do, True."""
    if not _is_sqlite(engine):
        return True
    idle = _idle(engine)
    driver, generation = idle.acquire()
    try:
        busy, _, _ = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except BaseException:
        idle.discard(driver)
        raise
    idle.release(driver, generation)
    return not busy


def _committed(engine: Engine, connection: RawConnection) -> None:
    for listener in _commit_listeners.get(engine, ()):
        listener(connection.info)


@contextmanager
def _pooled_transaction(engine: Engine, wait: bool) -> Iterator[RawConnection]:
    pooled = _checkout(engine)
    driver = pooled.driver_connection
    connection = RawConnection(driver, engine.dialect)
    try:
        try:
            if not wait:
                driver.execute(f"SET LOCAL lock_timeout = '{NO_WAIT_LOCK_TIMEOUT}'")
            yield connection
        except ConnectionLost:
            pooled.invalidate()
            raise
        except BaseException:
            driver.rollback()
            raise
        driver.commit()
    finally:
        pooled.close()
    _committed(engine, connection)


def _checkout(engine: Engine) -> Any:
    """A pooled DBAPI connection; once more if the first was found dead. A pool that has
    none free within its timeout is :class:`DatabaseBusy`."""
    try:
        try:
            return engine.raw_connection()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        return engine.raw_connection()
    except PoolTimeout as exc:
        raise _busy() from exc
