"""Jobs no longer wait for another job (preparing ahead removed: a step's job
starts only when the workflow service starts its step): drop after_job_id and
wired_variables.

It refuses to run while a job still waits: such a job would be released by
code that no longer exists. Run the previous version with
IK_WORKFLOW_PREPARE_AHEAD=off until none waits (each is released or cancelled
when its upstream job ends), then upgrade.

Revision ID: executor_0008
"""
import sqlalchemy as sa
from alembic import op

revision = "executor_0008"
down_revision = "executor_0007"


def upgrade() -> None:
    waiting = op.get_bind().execute(sa.text("SELECT count(*) FROM jobs WHERE status = 'waiting'")).scalar()
    if waiting:
        raise RuntimeError(
            f"{waiting} job(s) still wait for an upstream job: run the previous version with "
            "IK_WORKFLOW_PREPARE_AHEAD=off until none waits, then upgrade")
    op.drop_index("ix_jobs_after", "jobs")
    op.drop_column("jobs", "wired_variables")
    op.drop_column("jobs", "after_job_id")


def downgrade() -> None:
    op.add_column("jobs", sa.Column("after_job_id", sa.String(36), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("wired_variables", sa.JSON, nullable=True))
    op.create_index("ix_jobs_after", "jobs", ["after_job_id"])
