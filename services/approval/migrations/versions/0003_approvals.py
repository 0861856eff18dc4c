"""Approval requests, the approval flow flag and the resource owners projection.

Revision ID: approval_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "approval_0003"
down_revision = "approval_0002"

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("resource_id", sa.String(64), nullable=False, index=True),
        sa.Column("resource_name", sa.String(256), nullable=False),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("requester", sa.String(256), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("temporary_state_id", sa.String(64), nullable=False, index=True),
        sa.Column("plan_job_id", sa.String(64), nullable=False),
        sa.Column("plan_add", sa.Integer, nullable=False),
        sa.Column("plan_change", sa.Integer, nullable=False),
        sa.Column("plan_destroy", sa.Integer, nullable=False),
        sa.Column("workflow_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("decisions", sa.JSON, nullable=False),
        sa.Column("owners", sa.JSON, nullable=False),
        sa.Column("create_time", TS, nullable=False),
        sa.Column("update_time", TS, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "approval_flow",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("update_time", TS, nullable=False),
    )
    op.create_table(
        "resource_owners",
        sa.Column("resource_id", sa.String(64), primary_key=True),
        sa.Column("owners", sa.JSON, nullable=False),
        sa.Column("update_time", TS, nullable=False),
    )
