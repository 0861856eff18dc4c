"""Request ids of idempotent creates.

Revision ID: blueprint_0002
"""
from alembic import op

from services.common.tables import create_request_ids_table

revision = "blueprint_0002"
down_revision = "blueprint_0001"


def upgrade() -> None:
    create_request_ids_table(op)
