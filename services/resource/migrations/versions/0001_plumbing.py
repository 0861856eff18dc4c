"""Outbox and inbox.

Revision ID: resource_0001
"""
from alembic import op

from services.common.tables import create_plumbing_tables

revision = "resource_0001"
down_revision = None


def upgrade() -> None:
    create_plumbing_tables(op)
