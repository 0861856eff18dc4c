"""Keyset pagination: an index for each order and filter of the Lists.

Revision ID: executor_0005
"""
from services.common.migrations import create_indexes, drop_indexes

revision = "executor_0005"
down_revision = "executor_0004"

INDEXES = {
    "ix_jobs_created": ("jobs", ["create_time", "id"]),
    "ix_jobs_resource_created": ("jobs", ["resource_id", "create_time", "id"]),
    "ix_jobs_workflow_created": ("jobs", ["workflow_id", "create_time", "id"]),
    "ix_jobs_status_created": ("jobs", ["status", "create_time", "id"]),
    "ix_integrations_created": ("integrations", ["create_time", "id"]),
    "ix_secrets_created": ("secrets", ["create_time", "id"]),
    "ix_storages_created": ("storages", ["create_time", "id"]),
}


def upgrade() -> None:
    create_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
