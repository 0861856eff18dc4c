"""Resources are no longer prepared ahead (a step's job starts only when the
workflow service starts its step): drop prepared_after_job_id and
prepared_wiring.

A row prepared but not yet adopted is kept as an ordinary resource: once its
job started it is shown (it may have created infrastructure), and its step's
start adopted it or will be told it exists. It refuses to run while a row is
still hidden (prepared, its job not started): dropping the column would show
a resource whose job waits at the executor. Run the previous version with
IK_WORKFLOW_PREPARE_AHEAD=off until none is hidden (each is shown or dropped
when its upstream job ends), then upgrade.

Revision ID: resource_0009
"""
import sqlalchemy as sa
from alembic import op

revision = "resource_0009"
down_revision = "resource_0008"


def upgrade() -> None:
    hidden = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM resources WHERE prepared_after_job_id != '' AND status = 'queued'")).scalar()
    if hidden:
        raise RuntimeError(
            f"{hidden} resource(s) prepared ahead are still hidden: run the previous version with "
            "IK_WORKFLOW_PREPARE_AHEAD=off until none is, then upgrade")
    op.drop_column("resources", "prepared_wiring")
    op.drop_column("resources", "prepared_after_job_id")


def downgrade() -> None:
    op.add_column("resources", sa.Column("prepared_after_job_id", sa.String(36), nullable=False, server_default=""))
    op.add_column("resources", sa.Column("prepared_wiring", sa.JSON, nullable=True))
