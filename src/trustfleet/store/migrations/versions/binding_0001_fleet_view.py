"""binding: the fleet view (secure elements, the events hosts report, flags)

Revision ID: binding_0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "binding_0001"
down_revision = None
branch_labels = ("binding",)
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "se_elements",
        sa.Column("se_id", sa.String(length=32), nullable=False),
        sa.Column("bound_device", sa.String(length=64), nullable=True),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("binds", sa.Integer(), nullable=False),
        sa.Column("bound_at", _TZ, nullable=True),
        sa.Column("last_kind", sa.String(length=16), nullable=False),
        sa.Column("last_device", sa.String(length=64), nullable=False),
        sa.Column("last_at", _TZ, nullable=False),
        sa.Column("open_flags", sa.Integer(), nullable=False),
        sa.Column("first_seen_at", _TZ, nullable=False),
        sa.PrimaryKeyConstraint("se_id", name=op.f("pk_se_elements")),
    )
    with op.batch_alter_table("se_elements") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_se_elements_bound_device"), ["bound_device"], unique=False
        )
        batch_op.create_index("ix_se_elements_open_flags", ["open_flags"], unique=False)

    op.create_table(
        "se_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("report_id", sa.String(length=32), nullable=False),
        sa.Column("se_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reported_at", _TZ, nullable=False),
        sa.Column("received_at", _TZ, nullable=False),
        sa.Column("reported_by", sa.String(length=200), nullable=False),
        sa.CheckConstraint(
            "kind IN ('bound', 'locked', 'verified', 'failed', 'blocked')",
            name=op.f("ck_se_events_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["se_id"], ["se_elements.se_id"], name=op.f("fk_se_events_se_id_se_elements")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_se_events")),
        sa.UniqueConstraint("report_id", name=op.f("uq_se_events_report_id")),
    )
    with op.batch_alter_table("se_events") as batch_op:
        batch_op.create_index("ix_se_events_se_id_id", ["se_id", "id"], unique=False)

    op.create_table(
        "se_flags",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("se_id", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bound_device", sa.String(length=64), nullable=True),
        sa.Column("report_id", sa.String(length=32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("raised_at", _TZ, nullable=False),
        sa.Column("last_seen_at", _TZ, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("open_key", sa.String(length=140), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=200), nullable=True),
        sa.Column("acknowledged_at", _TZ, nullable=True),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.CheckConstraint(
            "rule IN ('foreign-failure', 'foreign-verification', 'moved', 'unknown-failure',"
            " 'home-failure')",
            name=op.f("ck_se_flags_rule"),
        ),
        sa.CheckConstraint("status IN ('open', 'acknowledged')", name=op.f("ck_se_flags_status")),
        sa.ForeignKeyConstraint(
            ["se_id"], ["se_elements.se_id"], name=op.f("fk_se_flags_se_id_se_elements")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"], ["se_events.report_id"], name=op.f("fk_se_flags_report_id_se_events")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_se_flags")),
        sa.UniqueConstraint("open_key", name=op.f("uq_se_flags_open_key")),
    )
    with op.batch_alter_table("se_flags") as batch_op:
        batch_op.create_index(batch_op.f("ix_se_flags_se_id"), ["se_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_se_flags_device_id"), ["device_id"], unique=False)
        batch_op.create_index("ix_se_flags_status_id", ["status", "id"], unique=False)


def downgrade() -> None:
    op.drop_table("se_flags")
    op.drop_table("se_events")
    op.drop_table("se_elements")
