"""The download's queries stay indexed however much history a terminal has."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from trustfleet.store.driver import Prepared
from trustfleet.tmk.lifecycle import OPEN_SESSIONS


def test_a_terminals_open_sessions_are_found_by_sn_and_stage(engine: Engine) -> None:
    """Anyone holding the gateway token can end sessions of a terminal by the thousand
    (start, then report a failure with the ticket): the proof's look-up of the terminal's
    open sessions must not read them all."""
    if engine.dialect.name != "sqlite":
        pytest.skip("the query plan is read from SQLite")
    prepared = Prepared(OPEN_SESSIONS, engine.dialect)
    values = prepared.parameters({"b_sn": "T1"})
    with engine.connect() as connection:
        plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + prepared.sql, values).all()
    details = " ".join(str(row[-1]) for row in plan)
    assert "ix_tmk_download_sessions_sn_stage (sn=? AND stage=?)" in details, details
