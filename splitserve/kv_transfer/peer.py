"""What this process looks like to a transfer peer: host, process, and the physical GPU (by UUID, since
CUDA_VISIBLE_DEVICES renumbers devices per process under Ray)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeerInfo:
    hostname: str
    pid: int
    device: str  # "cpu" or "cuda"
    gpu_uuid: str | None


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def local_cuda_index(uuid: str) -> int | None:
    """This process's index of the physical GPU ``uuid``, or None when it is not visible here."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


def this_process(device: torch.device | str | None = None) -> PeerInfo:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return PeerInfo(socket.gethostname(), os.getpid(), device.type, gpu_uuid(device))
