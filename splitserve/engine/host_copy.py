"""Small host-to-device copies that never wait for the device.

A ``torch.tensor(ids, device="cuda")`` copies from pageable memory, which waits for the stream and goes through the
driver's one staging buffer. On a worker whose default stream is busy with forward passes, every such copy on any
thread waits for the step in flight: a layer hook or a KV receiver that made one per layer ran at the engine's step
rate instead of at copy speed. The other way round holds too: a pageable device-to-host read (``.tolist()`` of a
CUDA tensor) keeps every other thread's copies and launches waiting until the step it reads is done, so results
come back through pinned memory and an event (``HostLists``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# How the caller waits for the device: given the blocking wait, it may let other threads work meanwhile.
DeviceWait = Callable[[Callable[[], None]], None]


def index_tensor(
    ids: list[int] | list[list[int]], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """``ids`` (a list, or a list of equal-length rows) as an integer tensor on ``device``, copied asynchronously on
    the current stream from pinned memory: build it on the stream that reads it (or one that stream waits for),
    since another stream can read it before the copy lands."""
    host = torch.tensor(ids, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class HostLists:
    """Device tensors on their way into pinned memory (on CUDA; on the CPU they are already there): ``wait`` gives
    them as Python lists once the copy is done, so the host can launch more work between the two."""

    def __init__(self, tensors: list[torch.Tensor]):
        self._done: torch.cuda.Event | None = None
        if not tensors or tensors[0].device.type != "cuda":
            self._hosts = tensors
            return
        self._hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, t in zip(self._hosts, tensors, strict=True):
            host.copy_(t, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self, wait: DeviceWait | None = None) -> list[list]:
        """The lists, after one wait for the copy (a pageable read would hold up the other threads' CUDA calls until
        the step is done, see above). ``wait`` runs the wait (on CPU, a no-op), so a worker can let other calls use
        its engine meanwhile."""
        run = wait or (lambda blocking: blocking())
        run(self._done.synchronize if self._done is not None else lambda: None)
        return [host.tolist() for host in self._hosts]
