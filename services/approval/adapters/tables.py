"""Tables of the approval service's own database."""
import sqlalchemy as sa

from services.common.tables import plumbing_tables

metadata = sa.MetaData()
outbox, inbox = plumbing_tables(metadata)
