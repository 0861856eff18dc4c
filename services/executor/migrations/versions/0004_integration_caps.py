"""Caps of concurrent jobs per integration, and why a queued job waits.

Revision ID: executor_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "executor_0004"
down_revision = "executor_0003"


def upgrade() -> None:
    op.add_column("integrations", sa.Column("max_concurrent_jobs", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("queue_reason", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("jobs", "queue_reason")
    op.drop_column("integrations", "max_concurrent_jobs")
