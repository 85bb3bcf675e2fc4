"""Generated gRPC stubs (see README)."""
