"""Teardown of a workflow's resources: the workflow's teardown status.

Revision ID: workflow_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "workflow_0004"
down_revision = "workflow_0003"


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("teardown_status", sa.String(16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("teardown_status")
