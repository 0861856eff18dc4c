"""Tables of the blueprint service's own database."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)

TS = sa.DateTime(timezone=True)

templates = sa.Table(
    "templates", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("abstract", sa.Boolean, nullable=False),
    sa.Column("parent_template_ids", sa.JSON, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("retry_policy", sa.JSON, nullable=False, server_default=sa.text("'{}'")),
)

source_code_versions = sa.Table(
    "source_code_versions", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("template_id", sa.String(36), sa.ForeignKey("templates.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("repository_url", sa.Text, nullable=False),
    sa.Column("ref", sa.String(256), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("commit", sa.String(64), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("declared_variables", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("variable_configs", sa.JSON, nullable=False),
    sa.Column("is_default", sa.Boolean, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

blueprints = sa.Table(
    "blueprints", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("creator", sa.String(256), nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("update_time", TS, nullable=False),
)

# Every revision of a blueprint, whole, so a workflow can read exactly the one it executed.
blueprint_revisions = sa.Table(
    "blueprint_revisions", metadata,
    sa.Column("blueprint_id", sa.String(36), sa.ForeignKey("blueprints.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("create_time", TS, nullable=False),
)

# Which templates and versions the latest revision of each blueprint uses
# (answers "which blueprints block deleting this template?").
blueprint_uses = sa.Table(
    "blueprint_uses", metadata,
    sa.Column("blueprint_id", sa.String(36), sa.ForeignKey("blueprints.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("template_id", sa.String(36), primary_key=True, index=True),
    sa.Column("source_code_version_id", sa.String(36), nullable=False, index=True),
)

# The Lists: keyset pages by (create_time, id) (source code versions also per template).
sa.Index("ix_templates_created", templates.c.create_time, templates.c.id)
sa.Index("ix_source_code_versions_template_created", source_code_versions.c.template_id,
         source_code_versions.c.create_time, source_code_versions.c.id)
sa.Index("ix_source_code_versions_created", source_code_versions.c.create_time, source_code_versions.c.id)
sa.Index("ix_blueprints_created", blueprints.c.create_time, blueprints.c.id)
