"""Keyset pagination: an index for each order and filter of ListWorkflows.

Revision ID: workflow_0005
"""
from services.common.migrations import create_indexes, drop_indexes

revision = "workflow_0005"
down_revision = "workflow_0004"

INDEXES = {
    "ix_workflows_created": ("workflows", ["create_time", "id"]),
    "ix_workflows_blueprint_created": ("workflows", ["blueprint_id", "create_time", "id"]),
    "ix_workflows_status_created": ("workflows", ["status", "create_time", "id"]),
}


def upgrade() -> None:
    create_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
