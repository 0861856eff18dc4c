"""The blueprint service (see docs/architecture.md)."""
