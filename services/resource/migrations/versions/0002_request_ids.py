"""Request ids of idempotent creates.

Revision ID: resource_0002
"""
from alembic import op

from services.common.tables import create_request_ids_table

revision = "resource_0002"
down_revision = "resource_0001"


def upgrade() -> None:
    create_request_ids_table(op)
