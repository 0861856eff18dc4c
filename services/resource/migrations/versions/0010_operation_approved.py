"""Whether a queued operation was approved, so its job's submission checks the
approval flow only when it was not (the flag may have been turned on since the
operation was queued).

Revision ID: resource_0010
"""
import sqlalchemy as sa
from alembic import op

revision = "resource_0010"
down_revision = "resource_0009"


def upgrade() -> None:
    op.add_column("resources", sa.Column("operation_approved", sa.Boolean, nullable=False,
                                         server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("resources", "operation_approved")
