"""The executor service (see docs/architecture.md)."""
