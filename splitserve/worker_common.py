"""Process setup shared by the prefill and decode worker actors."""

from __future__ import annotations

import logging
import os
import socket

import torch


def configure_worker_process() -> None:
    """Quiet, predictable workers: one intra-op thread per CPU worker (several share a small machine)."""
    logging.basicConfig(
        level=os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("SPLITSERVE_CPU_THREADS", "1")))


def describe_device(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {"device": str(device), "host": socket.gethostname(), "pid": os.getpid()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_uuid"] = str(getattr(props, "uuid", ""))
    return info


def node_address() -> str:
    """This node's address as Ray knows it (what peers on other nodes can reach); loopback outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not inside a Ray worker
        pass
    return "127.0.0.1"
