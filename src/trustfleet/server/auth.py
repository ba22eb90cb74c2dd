"""API tokens: create (text shown once), list, show, revoke, and authenticate a presented
token.

A token is ``"tf_" + urlsafe-base64(32 random bytes)``. Only its SHA-256 is stored, so a
database leak discloses no usable token; authentication looks a token up by that hash, which
reveals nothing about other tokens however long the lookup takes. Every change writes an
audit record in the same transaction. A token may expire (``expires_at``); its name is
unique among all tokens ever made, revoked and expired ones included, so the audit log's
``token:<id>:<name>`` never names two tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from trustfleet.errors import AuthenticationRequired, Conflict, InvalidInput, NotFound
from trustfleet.server.models import ROLES, ApiToken, Role
from trustfleet.store import MAX_INTEGER, Database, IntegrityViolation
from trustfleet.wire import as_utc

log = logging.getLogger("trustfleet.server.auth")

TOKEN_PREFIX = "tf_"  # noqa: S105 (a prefix, not a secret)
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 128
MAX_NAME_CHARS = 200
MAX_TOKEN_ID = MAX_INTEGER
MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=3660)
#: the role of the local principal (the CLI at the data directory); never a token's role
LOCAL_ROLE = "local"
LOCAL_ACTOR = "cli"
#: last_used_at is refreshed at most this often, so a busy token does not write every request
LAST_USED_RESOLUTION = timedelta(minutes=1)


class UnknownRole(InvalidInput):
    code = "unknown-role"
    title = "No such role"


class TokenNotFound(NotFound):
    code = "token-not-found"
    title = "No such API token"


class TokenNameTaken(Conflict):
    code = "token-name-taken"
    title = "A token of that name exists already (names are never reused)"


class LastAdminToken(Conflict):
    code = "last-admin-token"
    title = "Revoking this token would leave no live admin token"


class AuthenticationFailed(AuthenticationRequired):
    """Why a presented token was refused; ``reason`` goes to the audit log, never to the
    caller (who only learns that the token is not valid)."""

    def __init__(self, reason: str, token_id: int | None = None) -> None:
        super().__init__("A valid API token is required")
        self.reason = reason
        self.token_id = token_id


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never its text or hash."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None = None

    def active_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    @property
    def active(self) -> bool:
        return self.active_at(_now())


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request: a token's, or (``local``) the person at the
    data directory, whose CLI calls the API in process (:mod:`trustfleet.server.local`)."""

    name: str
    role: str
    token_id: int
    expires_at: datetime | None = None
    local: bool = False

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return LOCAL_ACTOR if self.local else f"token:{self.token_id}:{self.name}"


#: the principal of in-process calls from the CLI at the data directory
LOCAL_PRINCIPAL = Principal(name=LOCAL_ACTOR, role=LOCAL_ROLE, token_id=0, local=True)


def generate_token() -> str:
    raw = secrets.token_bytes(TOKEN_BYTES)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _info(row: Any) -> TokenInfo:
    """The info of a row of :data:`_INFO_COLUMNS`."""
    return TokenInfo(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
        last_used_at=as_utc(row.last_used_at) if row.last_used_at else None,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
    )


def valid_role(role: str) -> Role:
    if role not in ROLES:
        raise UnknownRole(f"unknown role; choose one of: {', '.join(sorted(ROLES))}")
    return Role(role)


def valid_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidInput(f"a token name is 1 to {MAX_NAME_CHARS} printable characters")
    return name


def valid_ttl(ttl: timedelta | None) -> timedelta | None:
    if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput("a token's time to live is between 1 minute and 3660 days")
    return ttl


_INFO_COLUMNS = (
    ApiToken.id,
    ApiToken.name,
    ApiToken.role,
    ApiToken.created_at,
    ApiToken.revoked_at,
    ApiToken.last_used_at,
    ApiToken.expires_at,
)
_INSERT_RETURNING_ID = (
    insert(ApiToken)
    .values(
        name=bindparam("name"),
        role=bindparam("role"),
        token_hash=bindparam("digest"),
        created_at=bindparam("now"),
        expires_at=bindparam("expires_at"),
    )
    .returning(ApiToken.id)
)
_ALL = select(*_INFO_COLUMNS).order_by(ApiToken.id)
_BY_ID = select(*_INFO_COLUMNS).where(ApiToken.id == bindparam("id"))
_BY_NAME = select(*_INFO_COLUMNS).where(ApiToken.name == bindparam("name"))
_BY_ID_FOR_UPDATE = _BY_ID.with_for_update()
#: the live admin tokens' rows, locked in one order: a revocation that checks another admin
#: remains holds them all, so two revocations of the last two admins take turns
_LIVE_ADMINS_FOR_UPDATE = (
    select(ApiToken.id, ApiToken.expires_at)
    .where(ApiToken.role == Role.ADMIN.value, ApiToken.revoked_at.is_(None))
    .order_by(ApiToken.id)
    .with_for_update()
)
_REVOKE = update(ApiToken).where(ApiToken.id == bindparam("id")).values(revoked_at=bindparam("now"))
# the token check, on every request
_TOKEN_BY_HASH = select(
    ApiToken.id,
    ApiToken.name,
    ApiToken.role,
    ApiToken.token_hash,
    ApiToken.revoked_at,
    ApiToken.last_used_at,
    ApiToken.expires_at,
).where(ApiToken.token_hash == bindparam("digest"))
_TOUCH = (
    update(ApiToken).where(ApiToken.id == bindparam("id")).values(last_used_at=bindparam("now"))
)


def create_token(
    db: Database,
    name: str,
    role: str,
    *,
    actor: str = "system",
    ttl: timedelta | None = None,
) -> tuple[str, TokenInfo]:
    """A new token for ``name`` with ``role``, valid for ``ttl`` (None: until revoked); its
    text is returned here and nowhere else. A name that any token ever had is refused
    (:class:`TokenNameTaken`)."""
    name, checked_role, ttl = valid_name(name), valid_role(role), valid_ttl(ttl)
    plaintext = generate_token()
    now = _now()
    expires_at = now + ttl if ttl is not None else None
    taken = TokenNameTaken(f"a token named {name[:60]!r} exists already: choose another name")
    try:
        with db.work() as work:
            if work.one(_BY_NAME, name=name) is not None:
                raise taken
            token_id = work.scalar(
                _INSERT_RETURNING_ID,
                name=name,
                role=checked_role.value,
                digest=hash_token(plaintext),
                now=now,
                expires_at=expires_at,
            )
            details: dict[str, object] = {"name": name, "role": checked_role.value}
            if expires_at is not None:
                details["expires_at"] = expires_at.isoformat()
            work.audit("token.created", actor=actor, subject=f"token:{token_id}", details=details)
    except IntegrityViolation:  # another node took the name between the check and the insert
        raise taken from None
    info = TokenInfo(
        id=token_id,
        name=name,
        role=checked_role.value,
        created_at=now,
        revoked_at=None,
        last_used_at=None,
        expires_at=expires_at,
    )
    return plaintext, info


def get_token(db: Database, token_id: int) -> TokenInfo:
    """The token with this id (:class:`TokenNotFound` if none)."""
    if not 1 <= token_id <= MAX_TOKEN_ID:
        raise TokenNotFound(f"no token has id {token_id}")
    row = db.read(lambda reads: reads.one(_BY_ID, id=token_id))
    if row is None:
        raise TokenNotFound(f"no token has id {token_id}")
    return _info(row)


def find_token(db: Database, name: str) -> TokenInfo:
    """The token named ``name`` (:class:`TokenNotFound` if none)."""
    row = db.read(lambda reads: reads.one(_BY_NAME, name=name.strip()))
    if row is None:
        raise TokenNotFound(f"no token is named {name.strip()[:60]!r}")
    return _info(row)


def list_tokens(db: Database, *, actor: str = "system") -> list[TokenInfo]:
    """Every token, revoked ones included, oldest first."""
    with db.work() as work:
        rows = work.all(_ALL)
        work.audit("token.listed", actor=actor, details={"count": len(rows)})
    return [_info(row) for row in rows]


def revoke_token(db: Database, token_id: int, *, actor: str = "system") -> TokenInfo:
    """Revoke a token; every node refuses it from the next request on. Revoking a revoked
    token changes nothing (and writes no second record). The last live (unrevoked,
    unexpired) admin token is never revoked (:class:`LastAdminToken`): nobody could
    administer the server over the API any more."""
    if not 1 <= token_id <= MAX_TOKEN_ID:
        raise TokenNotFound(f"no token has id {token_id}")
    with db.work() as work:
        now = _now()
        # the admin rows first, then the token's: one lock order for every revocation
        admins = work.all(_LIVE_ADMINS_FOR_UPDATE)
        row = work.one(_BY_ID_FOR_UPDATE, id=token_id)
        if row is None:
            raise TokenNotFound(f"no token has id {token_id}")
        if row.revoked_at is None and _is_live_admin(row.role, row.expires_at, now):
            _check_another_admin(admins, token_id, now)
        if row.revoked_at is None:
            row = row._replace(revoked_at=now)
            work.run(_REVOKE, id=token_id, now=row.revoked_at)
            work.audit(
                "token.revoked",
                actor=actor,
                subject=f"token:{token_id}",
                details={"name": row.name, "role": row.role},
            )
    return _info(row)


def _is_live_admin(role: str, expires_at: datetime | None, now: datetime) -> bool:
    return role == Role.ADMIN.value and (expires_at is None or now < as_utc(expires_at))


def _check_another_admin(admins: list[Any], token_id: int, now: datetime) -> None:
    """Refuse unless a live admin token other than ``token_id`` remains among ``admins``,
    the unrevoked admin rows read under lock (``FOR UPDATE``; on SQLite the unit of work
    holds the write lock): a concurrent revocation of another admin token waits for this
    one and then finds this one revoked."""
    if not any(a.id != token_id and _is_live_admin("admin", a.expires_at, now) for a in admins):
        raise LastAdminToken(
            "this is the last live admin token: revoking it would leave nobody able to"
            " administer the server over the API",
            hint="create another admin token first:"
            " trustfleet token create --name <name> --role admin",
        )


def bootstrap_admin_token(db: Database) -> str:
    """The first admin token, made by ``trustfleet init``; returns its text."""
    plaintext, _ = create_token(db, name="bootstrap admin", role=Role.ADMIN, actor="init")
    return plaintext


def touch(db: Database, token_id: int, now: datetime) -> None:
    """Record when a token was last used (at LAST_USED_RESOLUTION, to keep writes rare).
    Best effort: it waits for no other writer, and a refresh that cannot be made now (the
    database is busy, or failing) is skipped, to be made by a later request; it never
    fails the request it serves."""
    try:
        with db.work(wait=False) as work:
            work.run(_TOUCH, id=token_id, now=now)
    except Exception as exc:  # never the request's failure
        log.debug("token %s: last-used refresh skipped (%s)", token_id, type(exc).__name__)


@dataclass(frozen=True)
class TokenCheck:
    principal: Principal
    #: when the token's last_used_at is due for a refresh (:func:`touch`), else None
    touch_at: datetime | None


def check_token(db: Database, presented: str | None) -> TokenCheck:
    """The principal of a presented token, or :class:`AuthenticationFailed` with the reason
    (missing, malformed, unknown, revoked, expired). One indexed read, never a write."""
    if not presented:
        raise AuthenticationFailed("missing")
    if not presented.startswith(TOKEN_PREFIX) or len(presented) > MAX_TOKEN_CHARS:
        raise AuthenticationFailed("malformed")
    digest = hash_token(presented)
    row = db.read(lambda reads: reads.one(_TOKEN_BY_HASH, digest=digest))
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise AuthenticationFailed("unknown")
    if row.revoked_at is not None:
        raise AuthenticationFailed("revoked", row.id)
    now = _now()
    expires_at = as_utc(row.expires_at) if row.expires_at is not None else None
    if expires_at is not None and now >= expires_at:
        raise AuthenticationFailed("expired", row.id)
    if row.role not in ROLES:
        raise AuthenticationFailed("unknown-role", row.id)
    due = row.last_used_at is None or now - as_utc(row.last_used_at) >= LAST_USED_RESOLUTION
    principal = Principal(name=row.name, role=row.role, token_id=row.id, expires_at=expires_at)
    return TokenCheck(principal, now if due else None)


def authenticate(db: Database, presented: str | None) -> Principal:
    """:func:`check_token`, then the last-used refresh if it is due."""
    check = check_token(db, presented)
    if check.touch_at is not None:
        touch(db, check.principal.token_id, check.touch_at)
    return check.principal
