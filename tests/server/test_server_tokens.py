"""The token service: tokens are random, stored only as hashes, revocable, and audited."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.errors import InvalidInput
from trustfleet.server.auth import (
    AuthenticationFailed,
    TokenNameTaken,
    TokenNotFound,
    UnknownRole,
    authenticate,
    bootstrap_admin_token,
    create_token,
    find_token,
    get_token,
    list_tokens,
    revoke_token,
)
from trustfleet.server.models import ROLES, ApiToken
from trustfleet.store import Database, audit
from trustfleet.store.engine import make_engine, migrate


def _audit_actions(sessions: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    with sessions() as session:
        return [(r.action, r.actor, r.subject) for r in audit.iter_records(session)]


def _dump_database(engine: Engine) -> str:
    with engine.connect() as connection:
        rows = [
            *connection.execute(text("SELECT * FROM api_tokens")),
            *connection.execute(text("SELECT * FROM audit_log")),
        ]
    return json.dumps([list(map(str, row)) for row in rows])


def test_roles_are_exactly_the_seven() -> None:
    assert {
        "admin",
        "auditor",
        "manufacturer",
        "operator",
        "platform",
        "sms-gateway",
        "device-gateway",
    } == ROLES


def test_token_is_prefixed_urlsafe_base64_of_32_random_bytes(
    db: Database,
) -> None:
    first, _ = create_token(db, "a", "operator")
    second, _ = create_token(db, "b", "operator")
    assert first != second
    assert first.startswith("tf_")
    raw = base64.urlsafe_b64decode(first[3:] + "=")
    assert len(raw) == 32


def test_only_the_hash_is_stored(engine: Engine, db: Database) -> None:
    plaintext, info = create_token(db, "tms", "operator")
    revoke_token(db, info.id)
    dump = _dump_database(engine)
    assert plaintext not in dump
    assert plaintext[3:] not in dump
    assert hashlib.sha256(plaintext.encode()).hexdigest() in dump


def test_token_authenticates_as_its_name_and_role(db: Database) -> None:
    plaintext, info = create_token(db, "gateway 7", "sms-gateway")
    principal = authenticate(db, plaintext)
    assert (principal.name, principal.role, principal.token_id) == (
        "gateway 7",
        "sms-gateway",
        info.id,
    )


@pytest.mark.parametrize(
    "presented, reason",
    [
        (None, "missing"),
        ("", "missing"),
        ("not-a-token", "malformed"),
        ("tf_" + "A" * 500, "malformed"),
        ("tf_" + "A" * 43, "unknown"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(
    db: Database, presented: str | None, reason: str
) -> None:
    create_token(db, "x", "admin")
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate(db, presented)
    assert refused.value.reason == reason
    assert refused.value.code == "authentication-required"
    assert refused.value.status == 401


def test_a_token_with_one_character_changed_is_refused(db: Database) -> None:
    plaintext, _ = create_token(db, "x", "admin")
    altered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed):
        authenticate(db, altered)


def test_revoked_token_is_refused(db: Database) -> None:
    plaintext, info = create_token(db, "x", "platform")
    revoked = revoke_token(db, info.id, actor="admin-1")
    assert revoked.revoked_at is not None and not revoked.active
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate(db, plaintext)
    assert refused.value.reason == "revoked"
    assert refused.value.token_id == info.id


def test_revoking_twice_is_harmless_and_audited_once(
    sessions: sessionmaker[Session], db: Database
) -> None:
    _, info = create_token(db, "x", "platform")
    first = revoke_token(db, info.id)
    second = revoke_token(db, info.id)
    assert first.revoked_at == second.revoked_at
    actions = [a for a, _, _ in _audit_actions(sessions)]
    assert actions.count("token.revoked") == 1


@pytest.mark.parametrize("token_id", [0, -1, 12345, 2**70])
def test_revoking_an_unknown_token_is_not_found(db: Database, token_id: int) -> None:
    with pytest.raises(TokenNotFound) as missing:
        revoke_token(db, token_id)
    assert missing.value.status == 404


@pytest.mark.parametrize("role", ["root", "Admin", "", "admin ", "operator,admin"])
def test_unknown_roles_are_refused(db: Database, role: str) -> None:
    with pytest.raises(UnknownRole):
        create_token(db, "x", role)
    assert list_tokens(db) == []


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "line\nbreak", "x" * 201])
def test_bad_names_are_refused(db: Database, name: str) -> None:
    with pytest.raises(InvalidInput):
        create_token(db, name, "operator")


def test_every_change_is_audited_with_its_actor(
    sessions: sessionmaker[Session], db: Database
) -> None:
    _, info = create_token(db, "tms", "operator", actor="alice")
    list_tokens(db, actor="bob")
    revoke_token(db, info.id, actor="carol")
    assert _audit_actions(sessions) == [
        ("token.created", "alice", f"token:{info.id}"),
        ("token.listed", "bob", ""),
        ("token.revoked", "carol", f"token:{info.id}"),
    ]
    with sessions() as session:
        assert audit.verify_chain(audit.iter_records(session)).ok


def test_list_shows_revoked_tokens_and_no_secrets(db: Database) -> None:
    _, first = create_token(db, "one", "operator")
    create_token(db, "two", "manufacturer")
    revoke_token(db, first.id)
    listed = list_tokens(db)
    assert [(t.name, t.active) for t in listed] == [("one", False), ("two", True)]
    assert not any(hasattr(t, "token_hash") for t in listed)


def test_bootstrap_admin_token_is_a_working_admin_token(
    sessions: sessionmaker[Session], db: Database
) -> None:
    plaintext = bootstrap_admin_token(db)
    assert authenticate(db, plaintext).role == "admin"
    assert _audit_actions(sessions)[0][:2] == ("token.created", "init")


def test_last_used_is_recorded(sessions: sessionmaker[Session], db: Database) -> None:
    plaintext, info = create_token(db, "x", "operator")
    assert info.last_used_at is None
    authenticate(db, plaintext)
    with sessions() as session:
        used = session.scalars(select(ApiToken.last_used_at).where(ApiToken.id == info.id)).one()
    assert used is not None


def test_a_name_is_never_reused_even_after_revocation(db: Database) -> None:
    _, first = create_token(db, "gateway", "device-gateway")
    with pytest.raises(TokenNameTaken) as taken:
        create_token(db, "gateway", "operator")
    assert taken.value.status == 409 and "gateway" in taken.value.message
    revoke_token(db, first.id)
    with pytest.raises(TokenNameTaken):
        create_token(db, " gateway ", "device-gateway")  # names are compared trimmed
    assert [t.name for t in list_tokens(db)] == ["gateway"]


def test_tokens_are_shown_by_name_and_by_id(db: Database) -> None:
    _, info = create_token(db, "tms", "operator")
    assert find_token(db, "tms") == get_token(db, info.id) == info
    with pytest.raises(TokenNotFound):
        find_token(db, "nobody")
    with pytest.raises(TokenNotFound):
        get_token(db, info.id + 1)


def test_a_token_expires_after_its_ttl(engine: Engine, db: Database) -> None:
    before = datetime.now(UTC)
    plaintext, info = create_token(db, "temp", "operator", ttl=timedelta(hours=2))
    assert info.expires_at is not None
    assert before + timedelta(hours=2) <= info.expires_at <= datetime.now(UTC) + timedelta(hours=2)
    assert authenticate(db, plaintext).expires_at == info.expires_at
    with engine.begin() as connection:  # two hours later
        connection.execute(
            ApiToken.__table__.update().values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate(db, plaintext)
    assert refused.value.reason == "expired" and refused.value.token_id == info.id
    assert not get_token(db, info.id).active


@pytest.mark.parametrize("ttl", [timedelta(seconds=59), timedelta(days=3661), -timedelta(days=1)])
def test_a_ttl_out_of_bounds_is_refused(db: Database, ttl: timedelta) -> None:
    with pytest.raises(InvalidInput):
        create_token(db, "x", "operator", ttl=ttl)


def test_the_migration_renames_duplicate_names_and_keeps_the_tokens_working(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine, "server_0001")
        digests = {}
        with engine.begin() as connection:
            for token_id, name in [(1, "tms"), (2, "tms"), (3, "other"), (4, "tms"), (5, "tms #4")]:
                digests[token_id] = hashlib.sha256(f"tf_token{token_id}".encode()).hexdigest()
                connection.execute(
                    text(
                        "INSERT INTO api_tokens (id, name, role, token_hash, created_at)"
                        " VALUES (:id, :name, 'operator', :digest, :now)"
                    ),
                    {
                        "id": token_id,
                        "name": name,
                        "digest": digests[token_id],
                        "now": "2026-01-01",
                    },
                )
        migrate(engine)
        db = Database(engine)
        names = {t.id: t.name for t in list_tokens(db)}
        assert names == {1: "tms", 2: "tms #2", 3: "other", 4: "tms #4.1", 5: "tms #4"}
        assert authenticate(db, "tf_token4").name == "tms #4.1"
        assert all(t.expires_at is None for t in list_tokens(db))
        with pytest.raises(TokenNameTaken):
            create_token(db, "tms #2", "operator")
    finally:
        engine.dispose()
