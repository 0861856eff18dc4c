"""The provider lock file recorded on a resource's first run of a module that
ships none (services/executor/adapters/providers.py).

Revision ID: executor_0009
"""
import sqlalchemy as sa
from alembic import op

revision = "executor_0009"
down_revision = "executor_0008"


def upgrade() -> None:
    op.create_table(
        "provider_locks",
        sa.Column("resource_id", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(2400), nullable=False),
        sa.Column("lock_file", sa.Text, nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("provider_locks")
