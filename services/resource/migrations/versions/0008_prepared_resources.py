"""Resources prepared ahead for a workflow's next step (hidden until their job starts or the workflow adopts them).

Revision ID: resource_0008
"""
import sqlalchemy as sa
from alembic import op

revision = "resource_0008"
down_revision = "resource_0007"


def upgrade() -> None:
    op.add_column("resources", sa.Column("prepared_after_job_id", sa.String(36), nullable=False, server_default=""))
    op.add_column("resources", sa.Column("prepared_wiring", sa.JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("resources", "prepared_wiring")
    op.drop_column("resources", "prepared_after_job_id")
