"""Tables every service database has: the transactional outbox and the
idempotent inbox."""
from __future__ import annotations

import sqlalchemy as sa


def request_ids_table(metadata: sa.MetaData) -> sa.Table:
    """request_id -> what the first create made, so a retried create returns it."""
    return sa.Table(
        "request_ids",
        metadata,
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def create_request_ids_table(op) -> None:
    op.create_table(
        "request_ids",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def plumbing_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    outbox = sa.Table(
        "outbox",
        metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # W3C traceparent of the transaction that wrote the row (tracing on), sent as a NATS header.
        sa.Column("trace_context", sa.String(128), nullable=True),
    )
    inbox = sa.Table(
        "inbox",
        metadata,
        sa.Column("consumer", sa.String(128), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
    request_ids_table(metadata)
    return outbox, inbox


def add_outbox_trace_context(op) -> None:
    """For each service's migration that brought traces."""
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("trace_context", sa.String(128), nullable=True))


def drop_outbox_trace_context(op) -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("trace_context")


def create_plumbing_tables(op) -> None:
    """For each service's first Alembic migration."""
    op.create_table(
        "outbox",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.String(128), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
