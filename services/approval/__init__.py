"""The approval service (see docs/architecture.md)."""
