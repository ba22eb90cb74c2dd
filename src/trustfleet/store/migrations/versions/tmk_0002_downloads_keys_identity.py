"""tmk: download sessions, terminal master keys, working keys, download policies and the
key server's identity

Revision ID: tmk_0002
Revises: tmk_0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tmk_0002"
down_revision = "tmk_0001"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def _terminal_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["sn"], ["tmk_terminals.sn"], name=op.f(f"fk_{table}_sn_tmk_terminals")
    )


def _index(table: str, column: str) -> None:
    with op.batch_alter_table(table) as batch_op:
        batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)


def upgrade() -> None:
    op.create_table(
        "tmk_download_sessions",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("sn", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("state_json", sa.Text(), nullable=False),
        sa.Column("tmk_algorithm", sa.String(length=16), nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.CheckConstraint(
            "stage IN ('challenged', 'delivered', 'active', 'aborted')",
            name=op.f("ck_tmk_download_sessions_stage"),
        ),
        _terminal_fk("tmk_download_sessions"),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_tmk_download_sessions")),
    )
    _index("tmk_download_sessions", "sn")
    _index("tmk_download_sessions", "stage")

    op.create_table(
        "tmk_master_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sn", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("key_handle", sa.String(length=200), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("kcv_hex", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_sn", sa.String(length=64), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("activated_at", _TZ, nullable=True),
        sa.Column("retired_at", _TZ, nullable=True),
        sa.Column("destroyed_at", _TZ, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'active', 'retired', 'aborted')",
            name=op.f("ck_tmk_master_keys_status"),
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["tmk_download_sessions.session_id"],
            name=op.f("fk_tmk_master_keys_session_id_tmk_download_sessions"),
        ),
        _terminal_fk("tmk_master_keys"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tmk_master_keys")),
        sa.UniqueConstraint("active_sn", name=op.f("uq_tmk_master_keys_active_sn")),
        sa.UniqueConstraint("session_id", name=op.f("uq_tmk_master_keys_session_id")),
    )
    _index("tmk_master_keys", "sn")
    _index("tmk_master_keys", "status")

    op.create_table(
        "tmk_working_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sn", sa.String(length=64), nullable=False),
        sa.Column("tmk_id", sa.Integer(), nullable=False),
        sa.Column("usage", sa.String(length=2), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("key_version", sa.String(length=2), nullable=False),
        sa.Column("key_handle", sa.String(length=200), nullable=False),
        sa.Column("kcv_hex", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_slot", sa.String(length=80), nullable=True),
        sa.Column("issued_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("retired_at", _TZ, nullable=True),
        sa.Column("destroyed_at", _TZ, nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'retired')", name=op.f("ck_tmk_working_keys_status")
        ),
        sa.ForeignKeyConstraint(
            ["tmk_id"],
            ["tmk_master_keys.id"],
            name=op.f("fk_tmk_working_keys_tmk_id_tmk_master_keys"),
        ),
        _terminal_fk("tmk_working_keys"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tmk_working_keys")),
        sa.UniqueConstraint("active_slot", name=op.f("uq_tmk_working_keys_active_slot")),
    )
    _index("tmk_working_keys", "sn")
    _index("tmk_working_keys", "tmk_id")

    op.create_table(
        "tmk_download_policies",
        sa.Column("sn", sa.String(length=64), nullable=False),
        sa.Column("tmk_algorithm", sa.String(length=16), nullable=False),
        sa.Column("rotation_requested_at", _TZ, nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        _terminal_fk("tmk_download_policies"),
        sa.PrimaryKeyConstraint("sn", name=op.f("pk_tmk_download_policies")),
    )

    op.create_table(
        "tmk_server_identities",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("work_key_handle", sa.String(length=200), nullable=False),
        sa.Column("algorithm", sa.String(length=20), nullable=False),
        sa.Column("kswcrt_der", sa.LargeBinary(), nullable=False),
        sa.Column("serial_hex", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_slot", sa.Integer(), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("retired_at", _TZ, nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'retired', 'revoked')",
            name=op.f("ck_tmk_server_identities_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tmk_server_identities")),
        sa.UniqueConstraint("active_slot", name=op.f("uq_tmk_server_identities_active_slot")),
        sa.UniqueConstraint("serial_hex", name=op.f("uq_tmk_server_identities_serial_hex")),
    )


def downgrade() -> None:
    op.drop_table("tmk_server_identities")
    op.drop_table("tmk_download_policies")
    op.drop_table("tmk_working_keys")
    op.drop_table("tmk_master_keys")
    op.drop_table("tmk_download_sessions")
