"""Request ids of idempotent creates.

Revision ID: executor_0002
"""
from alembic import op

from services.common.tables import create_request_ids_table

revision = "executor_0002"
down_revision = "executor_0001"


def upgrade() -> None:
    create_request_ids_table(op)
