"""The resource service (see docs/architecture.md)."""
