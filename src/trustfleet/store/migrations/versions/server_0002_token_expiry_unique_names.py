"""server: API tokens expire (expires_at) and their names are unique

Revision ID: server_0002
Revises: server_0001
Create Date: 2026-12-06

Names were free text before, so a database may hold several tokens of one name. The oldest
token (lowest id) keeps the name; each later one is renamed ``<name> #<id>`` (clipped to
the column), which is unique because ids are. Only the name column changes: the tokens keep
working, and audit records already written still name them ``token:<id>:<old name>``
(the id identifies the token). Each rename is logged as a warning by the migration.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "server_0002"
down_revision = "server_0001"
branch_labels = None
depends_on = None

MAX_NAME_CHARS = 200
log = logging.getLogger("trustfleet.migrations")


def _renamed(name: str, token_id: int, taken: set[str]) -> str:
    suffix = f" #{token_id}"
    candidate = name[: MAX_NAME_CHARS - len(suffix)] + suffix
    extra = 1
    while candidate in taken:  # "<name> #<id>" was itself somebody's name
        suffix = f" #{token_id}.{extra}"
        candidate = name[: MAX_NAME_CHARS - len(suffix)] + suffix
        extra += 1
    return candidate


def upgrade() -> None:
    tokens = sa.table("api_tokens", sa.column("id", sa.Integer), sa.column("name", sa.String))
    connection = op.get_bind()
    rows = connection.execute(sa.select(tokens.c.id, tokens.c.name).order_by(tokens.c.id)).all()
    taken = {name for _, name in rows}
    seen: set[str] = set()
    for token_id, name in rows:
        if name not in seen:
            seen.add(name)
            continue
        new_name = _renamed(name, token_id, taken)
        taken.add(new_name)
        connection.execute(tokens.update().where(tokens.c.id == token_id).values(name=new_name))
        log.warning("token %d renamed from %r to %r (names are unique)", token_id, name, new_name)
    with op.batch_alter_table("api_tokens") as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_api_tokens_name"), ["name"])


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_api_tokens_name"), type_="unique")
        batch_op.drop_column("expires_at")
