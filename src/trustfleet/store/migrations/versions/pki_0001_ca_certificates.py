"""pki: certificate authorities and issued certificates

Revision ID: pki_0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "pki_0001"
down_revision = None
branch_labels = ("pki",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pki_cas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("algorithm", sa.String(length=20), nullable=False),
        sa.Column("key_handle", sa.String(length=200), nullable=False),
        sa.Column("certificate_der", sa.LargeBinary(), nullable=False),
        sa.Column("serial_hex", sa.String(length=40), nullable=False),
        sa.Column("parent_name", sa.String(length=63), nullable=True),
        sa.Column("path_length", sa.Integer(), nullable=False),
        sa.Column("crl_number", sa.Integer(), nullable=False),
        sa.Column("crl_der", sa.LargeBinary(), nullable=True),
        sa.Column("crl_this_update", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_name"], ["pki_cas.name"], name=op.f("fk_pki_cas_parent_name_pki_cas")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pki_cas")),
        sa.UniqueConstraint("name", name=op.f("uq_pki_cas_name")),
    )
    op.create_table(
        "pki_certificates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("serial_hex", sa.String(length=40), nullable=False),
        sa.Column("issuer_name", sa.String(length=63), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revocation_reason", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('root', 'intermediate', 'server', 'device')",
            name=op.f("ck_pki_certificates_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('active', 'revoked')", name=op.f("ck_pki_certificates_status")
        ),
        sa.ForeignKeyConstraint(
            ["issuer_name"],
            ["pki_cas.name"],
            name=op.f("fk_pki_certificates_issuer_name_pki_cas"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pki_certificates")),
        sa.UniqueConstraint("serial_hex", name=op.f("uq_pki_certificates_serial_hex")),
    )
    with op.batch_alter_table("pki_certificates") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_pki_certificates_issuer_name"), ["issuer_name"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_pki_certificates_subject"), ["subject"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pki_certificates") as batch_op:
        batch_op.drop_index(batch_op.f("ix_pki_certificates_subject"))
        batch_op.drop_index(batch_op.f("ix_pki_certificates_issuer_name"))
    op.drop_table("pki_certificates")
    op.drop_table("pki_cas")
