"""Keyset pagination: an index for each order and filter of the Lists, and
resource labels as rows (the label filter's index), filled from the
resources' labels.

Revision ID: resource_0006
"""
import json

import sqlalchemy as sa
from alembic import op

from services.common.migrations import create_indexes, drop_indexes

revision = "resource_0006"
down_revision = "resource_0005"

INDEXES = {
    "ix_resources_created": ("resources", ["create_time", "id"]),
    "ix_resources_template_created": ("resources", ["template_id", "create_time", "id"]),
    "ix_resources_workflow_created": ("resources", ["workflow_id", "create_time", "id"]),
    "ix_resources_state_created": ("resources", ["state", "create_time", "id"]),
    "ix_resources_status_created": ("resources", ["status", "create_time", "id"]),
    "ix_temporary_states_resource_created": ("temporary_states", ["resource_id", "create_time", "id"]),
    "ix_temporary_states_created": ("temporary_states", ["create_time", "id"]),
    "ix_audit_entries_resource_seq": ("audit_entries", ["resource_id", "seq"]),
    "ix_resource_labels_created": ("resource_labels", ["label", "create_time", "resource_id"]),
}


def upgrade() -> None:
    op.create_table(
        "resource_labels",
        sa.Column("label", sa.String(256), primary_key=True),
        sa.Column("resource_id", sa.String(36), primary_key=True, index=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    rows = op.get_bind().execute(sa.text("SELECT id, labels, create_time FROM resources")).fetchall()
    labels = sa.table("resource_labels", sa.column("label"), sa.column("resource_id"),
                      sa.column("create_time", sa.DateTime(timezone=True)))
    values = [{"label": label, "resource_id": rid, "create_time": created} for rid, raw, created in rows
              for label in dict.fromkeys(json.loads(raw) if isinstance(raw, str) else (raw or []))]
    if values:
        op.bulk_insert(labels, values)
    create_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
    op.drop_table("resource_labels")
