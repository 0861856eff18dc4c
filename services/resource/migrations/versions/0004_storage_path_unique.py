"""A storage path belongs to one resource: the resource service checks it
itself at create (the executor's claim, taken at the resource's first job,
stays the guard across everything that runs jobs).

Revision ID: resource_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "resource_0004"
down_revision = "resource_0003"


def upgrade() -> None:
    op.create_index("uq_resources_storage_path", "resources", ["storage_id", "storage_path"], unique=True,
                    sqlite_where=sa.text("storage_path != ''"), postgresql_where=sa.text("storage_path != ''"))


def downgrade() -> None:
    op.drop_index("uq_resources_storage_path", table_name="resources")
