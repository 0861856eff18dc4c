"""Approval requests of workflow plans: the plan, the step and each step's plan.

Revision ID: approval_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "approval_0004"
down_revision = "approval_0003"


def upgrade() -> None:
    op.add_column("approval_requests", sa.Column("workflow_plan_id", sa.String(64), nullable=False,
                                                 server_default=""))
    op.add_column("approval_requests", sa.Column("step_id", sa.String(64), nullable=False, server_default=""))
    op.add_column("approval_requests", sa.Column("planned_steps", sa.JSON, nullable=False,
                                                 server_default=sa.text("'[]'")))


def downgrade() -> None:
    for column in ("planned_steps", "step_id", "workflow_plan_id"):
        op.drop_column("approval_requests", column)
