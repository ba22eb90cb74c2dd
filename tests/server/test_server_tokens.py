"""The token service: tokens are random, stored only as hashes, revocable, and audited."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.errors import InvalidInput
from trustfleet.server.auth import (
    AuthenticationFailed,
    TokenNotFound,
    UnknownRole,
    authenticate,
    bootstrap_admin_token,
    create_token,
    list_tokens,
    revoke_token,
)
from trustfleet.server.models import ROLES
from trustfleet.store import audit


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


def test_roles_are_exactly_the_six() -> None:
    assert {
        "admin",
        "manufacturer",
        "operator",
        "platform",
        "sms-gateway",
        "device-gateway",
    } == ROLES


def test_token_is_prefixed_urlsafe_base64_of_32_random_bytes(
    sessions: sessionmaker[Session],
) -> None:
    first, _ = create_token(sessions, "a", "operator")
    second, _ = create_token(sessions, "b", "operator")
    assert first != second
    assert first.startswith("tf_")
    raw = base64.urlsafe_b64decode(first[3:] + "=")
    assert len(raw) == 32


def test_only_the_hash_is_stored(engine: Engine, sessions: sessionmaker[Session]) -> None:
    plaintext, info = create_token(sessions, "tms", "operator")
    revoke_token(sessions, info.id)
    dump = _dump_database(engine)
    assert plaintext not in dump
    assert plaintext[3:] not in dump
    assert hashlib.sha256(plaintext.encode()).hexdigest() in dump


def test_token_authenticates_as_its_name_and_role(sessions: sessionmaker[Session]) -> None:
    plaintext, info = create_token(sessions, "gateway 7", "sms-gateway")
    principal = authenticate(sessions, plaintext)
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
    sessions: sessionmaker[Session], presented: str | None, reason: str
) -> None:
    create_token(sessions, "x", "admin")
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate(sessions, presented)
    assert refused.value.reason == reason
    assert refused.value.code == "authentication-required"
    assert refused.value.status == 401


def test_a_token_with_one_character_changed_is_refused(sessions: sessionmaker[Session]) -> None:
    plaintext, _ = create_token(sessions, "x", "admin")
    altered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed):
        authenticate(sessions, altered)


def test_revoked_token_is_refused(sessions: sessionmaker[Session]) -> None:
    plaintext, info = create_token(sessions, "x", "platform")
    revoked = revoke_token(sessions, info.id, actor="admin-1")
    assert revoked.revoked_at is not None and not revoked.active
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate(sessions, plaintext)
    assert refused.value.reason == "revoked"
    assert refused.value.token_id == info.id


def test_revoking_twice_is_harmless_and_audited_once(sessions: sessionmaker[Session]) -> None:
    _, info = create_token(sessions, "x", "platform")
    first = revoke_token(sessions, info.id)
    second = revoke_token(sessions, info.id)
    assert first.revoked_at == second.revoked_at
    actions = [a for a, _, _ in _audit_actions(sessions)]
    assert actions.count("token.revoked") == 1


@pytest.mark.parametrize("token_id", [0, -1, 12345, 2**70])
def test_revoking_an_unknown_token_is_not_found(
    sessions: sessionmaker[Session], token_id: int
) -> None:
    with pytest.raises(TokenNotFound) as missing:
        revoke_token(sessions, token_id)
    assert missing.value.status == 404


@pytest.mark.parametrize("role", ["root", "Admin", "", "admin ", "operator,admin"])
def test_unknown_roles_are_refused(sessions: sessionmaker[Session], role: str) -> None:
    with pytest.raises(UnknownRole):
        create_token(sessions, "x", role)
    assert list_tokens(sessions) == []


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "line\nbreak", "x" * 201])
def test_bad_names_are_refused(sessions: sessionmaker[Session], name: str) -> None:
    with pytest.raises(InvalidInput):
        create_token(sessions, name, "operator")


def test_every_change_is_audited_with_its_actor(sessions: sessionmaker[Session]) -> None:
    _, info = create_token(sessions, "tms", "operator", actor="alice")
    list_tokens(sessions, actor="bob")
    revoke_token(sessions, info.id, actor="carol")
    assert _audit_actions(sessions) == [
        ("token.created", "alice", f"token:{info.id}"),
        ("token.listed", "bob", ""),
        ("token.revoked", "carol", f"token:{info.id}"),
    ]
    with sessions() as session:
        assert audit.verify_chain(audit.iter_records(session)).ok


def test_list_shows_revoked_tokens_and_no_secrets(sessions: sessionmaker[Session]) -> None:
    _, first = create_token(sessions, "one", "operator")
    create_token(sessions, "two", "manufacturer")
    revoke_token(sessions, first.id)
    listed = list_tokens(sessions)
    assert [(t.name, t.active) for t in listed] == [("one", False), ("two", True)]
    assert not any(hasattr(t, "token_hash") for t in listed)


def test_bootstrap_admin_token_is_a_working_admin_token(sessions: sessionmaker[Session]) -> None:
    plaintext = bootstrap_admin_token(sessions)
    assert authenticate(sessions, plaintext).role == "admin"
    assert _audit_actions(sessions)[0][:2] == ("token.created", "init")


def test_last_used_is_recorded(sessions: sessionmaker[Session]) -> None:
    plaintext, info = create_token(sessions, "x", "operator")
    assert info.last_used_at is None
    authenticate(sessions, plaintext)
    with sessions() as session:
        from trustfleet.server.models import ApiToken

        used = session.scalars(select(ApiToken.last_used_at).where(ApiToken.id == info.id)).one()
    assert used is not None
