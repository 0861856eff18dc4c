"""A template's default retry policy of transient step failures.

Revision ID: blueprint_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "blueprint_0004"
down_revision = "blueprint_0003"


def upgrade() -> None:
    op.add_column("templates", sa.Column("retry_policy", sa.JSON, nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    op.drop_column("templates", "retry_policy")
