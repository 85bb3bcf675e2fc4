"""What a worker does in the cluster; the values are the pool names users see (config keys, `scale`, metrics)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    PREFILL = "prefill"  # computes prompts and sends their KV to a decode worker
    DECODE = "decode"  # decodes requests whose KV arrived from a prefill worker
    # A decode worker that also runs whole requests when prefill is backed up (Splitwise's mixed pool).
    HYBRID = "hybrid"
