"""The last dry run of a resource and of a temporary state (job, status,
counts, times), shown on both.

Revision ID: resource_0005
"""
import sqlalchemy as sa
from alembic import op

revision = "resource_0005"
down_revision = "resource_0004"


def upgrade() -> None:
    op.add_column("resources", sa.Column("last_dry_run", sa.JSON, nullable=False, server_default=sa.text("'{}'")))
    op.add_column("temporary_states", sa.Column("dry_run", sa.JSON, nullable=False,
                                                server_default=sa.text("'{}'")))


def downgrade() -> None:
    op.drop_column("temporary_states", "dry_run")
    op.drop_column("resources", "last_dry_run")
