"""Traces: the outbox keeps the trace context of the transaction that wrote each row.

Revision ID: approval_0006
"""
from alembic import op

from services.common.tables import add_outbox_trace_context, drop_outbox_trace_context

revision = "approval_0006"
down_revision = "approval_0005"


def upgrade() -> None:
    add_outbox_trace_context(op)


def downgrade() -> None:
    drop_outbox_trace_context(op)
