"""Keyset pagination: an index for each order and filter of ListApprovalRequests.

Revision ID: approval_0005
"""
from services.common.migrations import create_indexes, drop_indexes

revision = "approval_0005"
down_revision = "approval_0004"

INDEXES = {
    "ix_approval_requests_created": ("approval_requests", ["create_time", "id"]),
    "ix_approval_requests_resource_created": ("approval_requests", ["resource_id", "create_time", "id"]),
    "ix_approval_requests_status_created": ("approval_requests", ["status", "create_time", "id"]),
}


def upgrade() -> None:
    create_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
