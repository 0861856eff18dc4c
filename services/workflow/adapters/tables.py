"""Tables of the workflow service's own database."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)

TS = sa.DateTime(timezone=True)

workflows = sa.Table(
    "workflows", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("blueprint_id", sa.String(36), nullable=False, index=True),
    sa.Column("blueprint_revision", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("executor", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("start_time", TS, nullable=True),
    sa.Column("completion_time", TS, nullable=True),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # A column (not in spec) so the reconciler finds teardowns under way.
    sa.Column("teardown_status", sa.String(16), nullable=False, server_default=""),
)

steps = sa.Table(
    "steps", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("workflow_id", sa.String(36), nullable=False, index=True),
    sa.Column("template_id", sa.String(36), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("waiting_reason", sa.Text, nullable=False),
    sa.Column("resource_id", sa.String(36), nullable=False),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("start_time", TS, nullable=True),
    sa.Column("completion_time", TS, nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
)

# ListWorkflows: keyset pages by (create_time, id), alone or per blueprint or status.
sa.Index("ix_workflows_created", workflows.c.create_time, workflows.c.id)
sa.Index("ix_workflows_blueprint_created", workflows.c.blueprint_id, workflows.c.create_time, workflows.c.id)
sa.Index("ix_workflows_status_created", workflows.c.status, workflows.c.create_time, workflows.c.id)
