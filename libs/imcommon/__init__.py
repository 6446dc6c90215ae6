"""Shared runtime of every service: config, logging, tracing, gRPC server lifecycle,
database migrations. Nothing service-specific lives here."""
