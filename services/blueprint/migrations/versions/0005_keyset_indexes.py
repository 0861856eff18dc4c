"""Keyset pagination: an index for each order and filter of the Lists.

Revision ID: blueprint_0005
"""
from services.common.migrations import create_indexes, drop_indexes

revision = "blueprint_0005"
down_revision = "blueprint_0004"

INDEXES = {
    "ix_templates_created": ("templates", ["create_time", "id"]),
    "ix_source_code_versions_template_created": ("source_code_versions", ["template_id", "create_time", "id"]),
    "ix_source_code_versions_created": ("source_code_versions", ["create_time", "id"]),
    "ix_blueprints_created": ("blueprints", ["create_time", "id"]),
}


def upgrade() -> None:
    create_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
