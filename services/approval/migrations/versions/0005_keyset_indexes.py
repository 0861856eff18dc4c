"""Keyset pagination: an index for each order and filter of ListApprovalRequests.

Revision ID: approval_0005
"""
from alembic import op

revision = "approval_0005"
down_revision = "approval_0004"

INDEXES = {
    "ix_approval_requests_created": ("approval_requests", ["create_time", "id"]),
    "ix_approval_requests_resource_created": ("approval_requests", ["resource_id", "create_time", "id"]),
    "ix_approval_requests_status_created": ("approval_requests", ["status", "create_time", "id"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
