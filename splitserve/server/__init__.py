"""The user-facing APIs: a gRPC service and an OpenAI-compatible HTTP API over one Cluster."""
