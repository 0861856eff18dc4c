"""Keyset pagination: an index for each order and filter of ListWorkflows.

Revision ID: workflow_0005
"""
from alembic import op

revision = "workflow_0005"
down_revision = "workflow_0004"

INDEXES = {
    "ix_workflows_created": ("workflows", ["create_time", "id"]),
    "ix_workflows_blueprint_created": ("workflows", ["blueprint_id", "create_time", "id"]),
    "ix_workflows_status_created": ("workflows", ["status", "create_time", "id"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
