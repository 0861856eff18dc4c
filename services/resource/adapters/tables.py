"""Tables of the resource service's own database."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)

TS = sa.DateTime(timezone=True)

resources = sa.Table(
    "resources", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("template_id", sa.String(36), nullable=False, index=True),
    sa.Column("source_code_version_id", sa.String(36), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("abstract", sa.Boolean, nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),
    sa.Column("sensitive_variables", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("parent_ids", sa.JSON, nullable=False),
    sa.Column("dependency_tags", sa.JSON, nullable=False),
    sa.Column("dependency_configs", sa.JSON, nullable=False),
    sa.Column("integration_ids", sa.JSON, nullable=False),
    sa.Column("secret_ids", sa.JSON, nullable=False),
    sa.Column("storage_id", sa.String(36), nullable=False),
    sa.Column("storage_path", sa.String(512), nullable=False),
    sa.Column("workspace", sa.String(256), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("owners", sa.JSON, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("last_job_id", sa.String(36), nullable=False),
    sa.Column("last_job_action", sa.String(16), nullable=False),
    sa.Column("job_request_id", sa.String(64), nullable=False),
    sa.Column("pending_operation", sa.String(16), nullable=False),
    sa.Column("temporary_state_id", sa.String(36), nullable=False),
    sa.Column("plan_job_id", sa.String(36), nullable=False),
    sa.Column("approval_request_id", sa.String(36), nullable=False),
    sa.Column("workflow_id", sa.String(64), nullable=False, index=True),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("ever_provisioned", sa.Boolean, nullable=False),
    sa.Column("operation_approved", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_dry_run", sa.JSON, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.UniqueConstraint("template_id", "source_code_version_id", "name", name="uq_resources_name"),
)
# Abstract resources have no storage path ('').
sa.Index("uq_resources_storage_path", resources.c.storage_id, resources.c.storage_path, unique=True,
         sqlite_where=resources.c.storage_path != "", postgresql_where=resources.c.storage_path != "")

# The orders and filters of ListResources, each served by an index (keyset
# pages continue after (create_time, id)).
sa.Index("ix_resources_created", resources.c.create_time, resources.c.id)
sa.Index("ix_resources_template_created", resources.c.template_id, resources.c.create_time, resources.c.id)
sa.Index("ix_resources_workflow_created", resources.c.workflow_id, resources.c.create_time, resources.c.id)
sa.Index("ix_resources_state_created", resources.c.state, resources.c.create_time, resources.c.id)
sa.Index("ix_resources_status_created", resources.c.status, resources.c.create_time, resources.c.id)

# Each resource's labels, one row per label, with the resource's creation
# time: a label's page is a range of (label, create_time, resource_id).
resource_labels = sa.Table(
    "resource_labels", metadata,
    sa.Column("label", sa.String(256), primary_key=True),
    sa.Column("resource_id", sa.String(36), primary_key=True, index=True),
    sa.Column("create_time", TS, nullable=False),
)
sa.Index("ix_resource_labels_created", resource_labels.c.label, resource_labels.c.create_time,
         resource_labels.c.resource_id)

# Parent -> child links, for children lookups (the destroy guard, the tree).
resource_links = sa.Table(
    "resource_links", metadata,
    sa.Column("parent_id", sa.String(36), primary_key=True),
    sa.Column("child_id", sa.String(36), primary_key=True, index=True),
)

temporary_states = sa.Table(
    "temporary_states", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("resource_id", sa.String(36), nullable=False, index=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("changes", sa.JSON, nullable=False),
    sa.Column("base_revision", sa.BigInteger, nullable=False),
    sa.Column("dry_run_job_id", sa.String(36), nullable=False),
    sa.Column("plan_add", sa.Integer, nullable=False),
    sa.Column("plan_change", sa.Integer, nullable=False),
    sa.Column("plan_destroy", sa.Integer, nullable=False),
    sa.Column("dry_run", sa.JSON, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("approval_request_id", sa.String(36), nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)
sa.Index("ix_temporary_states_resource_created", temporary_states.c.resource_id, temporary_states.c.create_time,
         temporary_states.c.id)
sa.Index("ix_temporary_states_created", temporary_states.c.create_time, temporary_states.c.id)

resource_revisions = sa.Table(
    "resource_revisions", metadata,
    sa.Column("resource_id", sa.String(36), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True),
    sa.Column("source_code_version_id", sa.String(36), nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
)

# The audit trail outlives the resource: no foreign key, never deleted with it.
audit_entries = sa.Table(
    "audit_entries", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("resource_id", sa.String(36), nullable=False, index=True),
    sa.Column("resource_name", sa.String(256), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("before", sa.JSON, nullable=False),
    sa.Column("after", sa.JSON, nullable=False),
    sa.Column("time", TS, nullable=False),
)
sa.Index("ix_audit_entries_resource_seq", audit_entries.c.resource_id, audit_entries.c.seq)

# What this service knows of others' settings (the approval flow flag).
settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("update_time", TS, nullable=False),
)
