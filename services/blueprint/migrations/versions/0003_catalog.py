"""Templates, source code versions, blueprints.

Revision ID: blueprint_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "blueprint_0003"
down_revision = "blueprint_0002"

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "templates",
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
    )
    op.create_table(
        "source_code_versions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("template_id", sa.String(36), sa.ForeignKey("templates.id", ondelete="CASCADE"), nullable=False),
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
    op.create_index("ix_source_code_versions_template_id", "source_code_versions", ["template_id"])
    op.create_table(
        "blueprints",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False, unique=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("creator", sa.String(256), nullable=False),
        sa.Column("create_time", TS, nullable=False),
        sa.Column("update_time", TS, nullable=False),
    )
    op.create_table(
        "blueprint_revisions",
        sa.Column("blueprint_id", sa.String(36), sa.ForeignKey("blueprints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("revision", sa.Integer, primary_key=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("create_time", TS, nullable=False),
    )
    op.create_table(
        "blueprint_uses",
        sa.Column("blueprint_id", sa.String(36), sa.ForeignKey("blueprints.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("template_id", sa.String(36), primary_key=True),
        sa.Column("source_code_version_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_blueprint_uses_template_id", "blueprint_uses", ["template_id"])
    op.create_index("ix_blueprint_uses_source_code_version_id", "blueprint_uses", ["source_code_version_id"])
