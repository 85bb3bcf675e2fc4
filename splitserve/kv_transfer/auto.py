"""Which backend a sender uses for a given receiver, with the reason in words (logged, and shown in docs)."""

from __future__ import annotations

from splitserve.kv_transfer.base import ReceiverEndpoint
from splitserve.kv_transfer.peer import PeerInfo, local_cuda_index


def nccl_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_nccl_available()


def choose_backend(endpoint: ReceiverEndpoint, here: PeerInfo) -> tuple[str, str]:
    offers = set(endpoint.backends)
    same_host = endpoint.hostname == here.hostname
    if endpoint.in_process(here):
        if "local" in offers:
            return "local", "sender and receiver are the same process"
        # CUDA cannot open an IPC handle in the process that exported it, and an NCCL pair needs two ranks.
        return "grpc", "same process, and the receiver does not offer local: neither cuda_ipc nor nccl works here"
    both_cuda = here.device == "cuda" and endpoint.device == "cuda"
    if both_cuda and same_host and "cuda_ipc" in offers and endpoint.gpu_uuid is not None:
        if local_cuda_index(endpoint.gpu_uuid) is not None:
            return "cuda_ipc", f"same node, and the receiver's GPU {endpoint.gpu_uuid} is visible here"
        why_not_ipc = "its GPU is not visible here (CUDA_VISIBLE_DEVICES)"
    else:
        why_not_ipc = "not both on CUDA on one node"
    if both_cuda and "nccl" in offers and nccl_available():
        return "nccl", f"both on CUDA in different processes, NCCL available; no cuda_ipc: {why_not_ipc}"
    why_not_nccl = f"NCCL {'not offered' if 'nccl' not in offers else 'unavailable'}"
    if "tcp" in offers and endpoint.tcp_address is not None:
        return "tcp", f"no cuda_ipc ({why_not_ipc}) and {why_not_nccl}: layers on a TCP connection, control on gRPC"
    return "grpc", f"fallback: {why_not_ipc}, and {why_not_nccl}"
