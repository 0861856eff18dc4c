"""Tables of the approval service's own database."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)

TS = sa.DateTime(timezone=True)

approval_requests = sa.Table(
    "approval_requests", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("resource_id", sa.String(64), nullable=False, index=True),
    sa.Column("resource_name", sa.String(256), nullable=False),
    sa.Column("operation", sa.String(16), nullable=False),
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("temporary_state_id", sa.String(64), nullable=False, index=True),
    sa.Column("plan_job_id", sa.String(64), nullable=False),
    sa.Column("plan_add", sa.Integer, nullable=False),
    sa.Column("plan_change", sa.Integer, nullable=False),
    sa.Column("plan_destroy", sa.Integer, nullable=False),
    sa.Column("workflow_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("decisions", sa.JSON, nullable=False),
    sa.Column("owners", sa.JSON, nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("workflow_plan_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("step_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("planned_steps", sa.JSON, nullable=False, server_default=sa.text("'[]'")),
)

# ListApprovalRequests: keyset pages by (create_time, id), alone or per resource or status.
sa.Index("ix_approval_requests_created", approval_requests.c.create_time, approval_requests.c.id)
sa.Index("ix_approval_requests_resource_created", approval_requests.c.resource_id, approval_requests.c.create_time,
         approval_requests.c.id)
sa.Index("ix_approval_requests_status_created", approval_requests.c.status, approval_requests.c.create_time,
         approval_requests.c.id)

# The platform-wide flag: a single row (id = 1) once it was first set.
approval_flow = sa.Table(
    "approval_flow", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("update_time", TS, nullable=False),
)

# Who owns each resource, kept from the resource service's events, so
# decisions need no call to the resource service (which may be down).
resource_owners = sa.Table(
    "resource_owners", metadata,
    sa.Column("resource_id", sa.String(64), primary_key=True),
    sa.Column("owners", sa.JSON, nullable=False),
    sa.Column("update_time", TS, nullable=False),
)
