"""Outbox and inbox.

Revision ID: executor_0001
"""
from alembic import op

from services.common.tables import create_plumbing_tables

revision = "executor_0001"
down_revision = None


def upgrade() -> None:
    create_plumbing_tables(op)
