"""Plumbing shared by every InfraKitchen service: configuration, database,
events (outbox, inbox, consumers), gRPC server bootstrap and authentication.
Nothing context-specific lives here."""
