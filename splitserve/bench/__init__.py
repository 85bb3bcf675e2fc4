"""Serving benchmarks: an open-loop load generator over the gRPC SDK, the HF ``generate`` baseline, and reports;
and the engine and KV-transfer timing (``engine_timing``, ``kv_timing``) that ``benchmarks/`` and
``splitserve profile`` share."""
