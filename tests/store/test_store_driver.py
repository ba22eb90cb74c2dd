"""trustfleet.store.driver: Core statements run on the driver read and write exactly what the ORM
does, transactions commit or roll back as a whole, and commit listeners see only commits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, event, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.server.models import ApiToken
from trustfleet.store.driver import (
    IntegrityViolation,
    RawTransactionDoomed,
    on_commit,
    raw_reading,
    raw_transaction,
    read,
    read_engine,
)
from trustfleet.wire import as_utc

_INSERT = insert(ApiToken).values(
    name=bindparam("name"),
    role="operator",  # a literal: bound from the statement itself
    token_hash=bindparam("digest"),
    created_at=bindparam("at"),
)
_BY_DIGEST = select(ApiToken.id, ApiToken.name, ApiToken.role, ApiToken.created_at).where(
    ApiToken.token_hash == bindparam("digest")
)
_REVOKE = (
    update(ApiToken)
    .where(ApiToken.token_hash == bindparam("digest"))
    .values(revoked_at=bindparam("at"))
)
AT = datetime(2026, 1, 31, 12, 30, 15, 123456, tzinfo=UTC)


def _add(engine: Engine, digest: str, name: str | None = None) -> None:
    values = {"name": name or f"raw {digest}", "digest": digest, "at": AT}  # names are unique
    with raw_transaction(engine) as connection:
        assert connection.run(_INSERT, values) == 1


def test_what_the_driver_writes_the_orm_reads_and_back(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _add(engine, "a" * 64, name="raw")
    with sessions() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_hash == "a" * 64)).one()
        assert (row.name, row.role, as_utc(row.created_at)) == ("raw", "operator", AT)
        session.add(ApiToken(name="orm", role="admin", token_hash="b" * 64, created_at=AT))
        session.commit()
    found = read(read_engine(engine), lambda c: c.one(_BY_DIGEST, {"digest": "b" * 64}))
    assert (found.name, found.role, as_utc(found.created_at)) == ("orm", "admin", AT)
    assert read(read_engine(engine), lambda c: c.one(_BY_DIGEST, {"digest": "c" * 64})) is None


def test_a_missing_parameter_is_refused_before_anything_runs(engine: Engine) -> None:
    with pytest.raises(TypeError, match="digest"), raw_transaction(engine) as connection:
        connection.run(_INSERT, {"name": "no digest", "at": AT})
    with raw_reading(read_engine(engine)) as connection:
        assert connection.all(select(ApiToken.id)) == []


def test_an_error_rolls_the_whole_transaction_back(engine: Engine) -> None:
    with pytest.raises(RuntimeError), raw_transaction(engine) as connection:
        connection.run(_INSERT, {"name": "first", "digest": "d" * 64, "at": AT})
        raise RuntimeError("the use case failed after its first write")
    with raw_reading(read_engine(engine)) as connection:
        assert connection.one(_BY_DIGEST, {"digest": "d" * 64}) is None


def test_a_constraint_violation_is_a_raw_integrity_error_and_nothing_is_written(
    engine: Engine,
) -> None:
    _add(engine, "e" * 64)
    with pytest.raises(IntegrityViolation), raw_transaction(engine) as connection:
        connection.run(_REVOKE, {"digest": "e" * 64, "at": AT})
        connection.run(_INSERT, {"name": "duplicate", "digest": "e" * 64, "at": AT})
    row = read(read_engine(engine), lambda c: c.one(select(ApiToken.revoked_at)))
    assert row.revoked_at is None  # the update before the failure was rolled back too


def test_commit_listeners_see_committed_transactions_only(engine: Engine) -> None:
    seen: list[dict[str, Any]] = []
    on_commit(engine, lambda info: seen.append(dict(info)))
    with raw_transaction(engine) as connection:
        connection.info["note"] = "kept"
        connection.run(_INSERT, {"name": "x", "digest": "f" * 64, "at": AT})
    with pytest.raises(RuntimeError), raw_transaction(engine) as connection:
        connection.info["note"] = "rolled back"
        raise RuntimeError
    assert seen == [{"note": "kept"}]


def test_connections_are_reused_and_closed_with_the_engine(engine: Engine) -> None:
    reads = read_engine(engine)
    assert read_engine(engine) is reads
    made: list[object] = []
    for each in {engine, reads}:
        event.listen(each, "connect", lambda connection, _: made.append(connection))
    for n in range(50):
        read(reads, lambda c: c.all(select(ApiToken.id)))
        _add(engine, f"{n:064d}")
    assert len(made) <= 2  # one for reads, one for writes at most: never one per use
    engine.dispose()  # closes the kept connections; new ones are made on demand
    assert len(read(reads, lambda c: c.all(select(ApiToken.id)))) == 50


def _exists(engine: Engine, digest: str) -> bool:
    return read(read_engine(engine), lambda c: c.one(_BY_DIGEST, {"digest": digest})) is not None


def test_a_nested_transaction_joins_the_outer_one_and_commits_with_it(engine: Engine) -> None:
    with raw_transaction(engine) as outer:
        outer.run(_INSERT, {"name": "outer", "digest": "1" * 64, "at": AT})
        with raw_transaction(engine) as inner:
            assert inner is outer
            inner.run(_INSERT, {"name": "inner", "digest": "2" * 64, "at": AT})
        # reads inside the transaction see its own writes, on either engine
        assert read(read_engine(engine), lambda c: c.one(_BY_DIGEST, {"digest": "2" * 64}))
        with raw_reading(engine) as reading:
            assert reading is outer
    assert _exists(engine, "1" * 64) and _exists(engine, "2" * 64)


def test_a_joined_transaction_rolls_back_with_the_outer_one(engine: Engine) -> None:
    with pytest.raises(RuntimeError), raw_transaction(engine) as outer:
        with raw_transaction(engine) as inner:
            inner.run(_INSERT, {"name": "inner", "digest": "3" * 64, "at": AT})
        outer.run(_INSERT, {"name": "outer", "digest": "4" * 64, "at": AT})
        raise RuntimeError("the use case failed after the joined block")
    assert not _exists(engine, "3" * 64) and not _exists(engine, "4" * 64)


def test_an_error_caught_after_leaving_a_joined_block_dooms_the_outer_one(
    engine: Engine,
) -> None:
    with pytest.raises(RawTransactionDoomed), raw_transaction(engine) as outer:
        outer.run(_INSERT, {"name": "outer", "digest": "5" * 64, "at": AT})
        try:
            with raw_transaction(engine) as inner:
                inner.run(_INSERT, {"name": "half", "digest": "6" * 64, "at": AT})
                raise RuntimeError("half done")
        except RuntimeError:
            pass  # a caller that swallows the failure must not commit the half
    assert not _exists(engine, "5" * 64) and not _exists(engine, "6" * 64)
    _add(engine, "7" * 64)  # and the next transaction is a fresh one
    assert _exists(engine, "7" * 64)
