"""The workflow service (see docs/architecture.md)."""
