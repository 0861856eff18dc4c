"""Jobs submitted after another job: they wait for it, then take its outputs.

Revision ID: executor_0007
"""
import sqlalchemy as sa
from alembic import op

revision = "executor_0007"
down_revision = "executor_0006"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("after_job_id", sa.String(36), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("wired_variables", sa.JSON, nullable=True))
    op.create_index("ix_jobs_after", "jobs", ["after_job_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_after", "jobs")
    op.drop_column("jobs", "wired_variables")
    op.drop_column("jobs", "after_job_id")
