"""Traces: the outbox keeps the trace context of the transaction that wrote each row.

Revision ID: resource_0007
"""
from alembic import op

from services.common.tables import add_outbox_trace_context, drop_outbox_trace_context

revision = "resource_0007"
down_revision = "resource_0006"


def upgrade() -> None:
    add_outbox_trace_context(op)


def downgrade() -> None:
    drop_outbox_trace_context(op)
