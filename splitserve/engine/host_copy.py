"""Small host-to-device copies that never wait for the device.

A ``torch.tensor(ids, device="cuda")`` copies from pageable memory, which waits for the stream and goes through the
driver's one staging buffer. On a worker whose default stream is busy with forward passes, every such copy on any
thread waits for the step in flight: a layer hook or a KV receiver that made one per layer ran at the engine's step
rate instead of at copy speed.
"""

from __future__ import annotations

import torch


def index_tensor(
    ids: list[int] | list[list[int]], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """``ids`` (a list, or a list of equal-length rows) as an integer tensor on ``device``, copied asynchronously on
    the current stream from pinned memory."""
    host = torch.tensor(ids, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def as_index(ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An index already on the device (built once per transfer) as is; a list copied as ``index_tensor`` does."""
    return ids if isinstance(ids, torch.Tensor) else index_tensor(ids, device)
