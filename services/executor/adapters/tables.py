"""Tables of the executor service's own database. Secret material (credentials,
secret values, sensitive variables and outputs, saved plans) is stored only
sealed by the Vault."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)

TS = sa.DateTime(timezone=True)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("source", sa.JSON, nullable=False),
    sa.Column("commit", sa.String(64), nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),
    sa.Column("sensitive_values", sa.LargeBinary, nullable=True),
    sa.Column("sensitive_variables", sa.JSON, nullable=False),
    sa.Column("integration_ids", sa.JSON, nullable=False),
    sa.Column("secret_ids", sa.JSON, nullable=False),
    sa.Column("storage_id", sa.String(36), nullable=False),
    sa.Column("state_path", sa.String(512), nullable=False),
    sa.Column("resource_id", sa.String(64), nullable=False, index=True),
    sa.Column("resource_revision", sa.BigInteger, nullable=False),
    sa.Column("workflow_id", sa.String(64), nullable=False, index=True),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("temporary_state_id", sa.String(64), nullable=False),
    sa.Column("template_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("plan_job_id", sa.String(36), nullable=False),
    sa.Column("timeout_seconds", sa.Float, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("sensitive_outputs", sa.LargeBinary, nullable=True),
    sa.Column("plan_summary", sa.JSON, nullable=True),
    sa.Column("plan_file", sa.LargeBinary, nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(256), nullable=False),
    sa.Column("lease_until", TS, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("start_time", TS, nullable=True),
    sa.Column("end_time", TS, nullable=True),
    sa.Column("queue_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("via", sa.String(32), nullable=False, server_default=""),
    sa.Index("ix_jobs_state", "storage_id", "state_path"),
    # ListJobs: keyset pages by (create_time, id), alone or per resource, workflow or status.
    sa.Index("ix_jobs_created", "create_time", "id"),
    sa.Index("ix_jobs_resource_created", "resource_id", "create_time", "id"),
    sa.Index("ix_jobs_workflow_created", "workflow_id", "create_time", "id"),
    sa.Index("ix_jobs_status_created", "status", "create_time", "id"),
)

job_logs = sa.Table(
    "job_logs", metadata,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("number", sa.BigInteger, primary_key=True),
    sa.Column("time", TS, nullable=False),
    sa.Column("stream", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
)

integrations = sa.Table(
    "integrations", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("credentials", sa.LargeBinary, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("max_concurrent_jobs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("oidc", sa.JSON, nullable=True),  # OIDC integrations: how jobs federate (not secret)
)

secrets = sa.Table(
    "secrets", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("exposure", sa.String(16), nullable=False),
    sa.Column("secret_values", sa.LargeBinary, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

storages = sa.Table(
    "storages", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("local_directory", sa.Text, nullable=False),
    sa.Column("pg_connection", sa.LargeBinary, nullable=True),
    sa.Column("pg_schema", sa.String(63), nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

state_path_claims = sa.Table(
    "state_path_claims", metadata,
    sa.Column("storage_id", sa.String(36), primary_key=True),
    sa.Column("state_path", sa.String(512), primary_key=True),
    sa.Column("resource_id", sa.String(64), nullable=False),
    sa.Column("create_time", TS, nullable=False),
)

# The provider lock file recorded on a resource's first run of a module that
# ships none: its later runs of the same source install the same providers.
provider_locks = sa.Table(
    "provider_locks", metadata,
    sa.Column("resource_id", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(2400), nullable=False),  # repository url, path and ref it was recorded for
    sa.Column("lock_file", sa.Text, nullable=False),
    sa.Column("update_time", TS, nullable=False),
)

# The keys the executor signs jobs' OIDC tokens with (services/executor/adapters/oidc.py):
# the newest signs, every key still within a token's lifetime is published.
oidc_keys = sa.Table(
    "oidc_keys", metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("private_key", sa.LargeBinary, nullable=False),  # sealed by the vault
    sa.Column("create_time", TS, nullable=False),
)

# The Lists of integrations, secrets and storages: keyset pages by (create_time, id).
sa.Index("ix_integrations_created", integrations.c.create_time, integrations.c.id)
sa.Index("ix_secrets_created", secrets.c.create_time, secrets.c.id)
sa.Index("ix_storages_created", storages.c.create_time, storages.c.id)
