"""Workload identity federation: OIDC integrations, the keys the executor
signs jobs' tokens with, the template a job works for (a token names it), and
the service that submitted a job for its user.

Revision ID: executor_0010
"""
import sqlalchemy as sa
from alembic import op

revision = "executor_0010"
down_revision = "executor_0009"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("template_id", sa.String(64), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("via", sa.String(32), nullable=False, server_default=""))
    op.add_column("integrations", sa.Column("oidc", sa.JSON, nullable=True))
    op.create_table(
        "oidc_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("private_key", sa.LargeBinary, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("oidc_keys")
    op.drop_column("integrations", "oidc")
    op.drop_column("jobs", "via")
    op.drop_column("jobs", "template_id")
