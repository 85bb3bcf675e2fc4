"""Serving benchmarks: an open-loop load generator over the gRPC SDK, the HF ``generate`` baseline, and reports."""
