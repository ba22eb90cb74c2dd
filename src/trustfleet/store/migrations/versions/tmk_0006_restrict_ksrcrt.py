"""tmk: the key server's root CA (KSRCRT, ``tmk-ksrcrt``) is restricted

Revision ID: tmk_0006
Revises: tmk_0005
Create Date: 2026-12-06

Before, an admin could have the generic issuing route make a certificate under KSRCRT for
any key, and terminals would take it for the key server's. A KSRCRT made from now on is
created restricted; this marks one made before. Certificates it already issued are left
as they are: list them with the PKI's records and revoke any that is not a work
certificate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tmk_0006"
down_revision = "tmk_0005"
branch_labels = None
depends_on = ("pki_0002",)


def upgrade() -> None:
    cas = sa.table("pki_cas", sa.column("name", sa.String), sa.column("restricted", sa.Boolean))
    op.execute(cas.update().where(cas.c.name == "tmk-ksrcrt").values(restricted=True))


def downgrade() -> None:
    cas = sa.table("pki_cas", sa.column("name", sa.String), sa.column("restricted", sa.Boolean))
    op.execute(cas.update().where(cas.c.name == "tmk-ksrcrt").values(restricted=False))
