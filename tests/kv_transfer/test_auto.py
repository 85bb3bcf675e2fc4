"""auto's choice of backend for each placement of sender and receiver, and the reason it gives.

Whether a GPU is visible and whether NCCL is built in are replaced by fakes (monkeypatched), so every branch runs on
CPU; the backends themselves are tested elsewhere.
"""

from __future__ import annotations

import pytest

from splitserve.kv_transfer import auto
from splitserve.kv_transfer.base import ReceiverEndpoint
from splitserve.kv_transfer.peer import PeerInfo

ALL = ("local", "cuda_ipc", "nccl", "grpc")
HERE = PeerInfo("node-a", 100, "cuda", "GPU-0")


def _endpoint(host="node-a", pid=200, device="cuda", uuid="GPU-1", backends=ALL) -> ReceiverEndpoint:
    return ReceiverEndpoint("r", host, pid, device, gpu_uuid=uuid, backends=backends)


@pytest.fixture
def gpus_visible(monkeypatch):
    """Fake: this process sees GPU-0 and GPU-1 (as index 0 and 1), and NCCL is built in."""
    monkeypatch.setattr(auto, "local_cuda_index", {"GPU-0": 0, "GPU-1": 1}.get)
    monkeypatch.setattr(auto, "nccl_available", lambda: True)


def test_same_process_takes_local():
    assert auto.choose_backend(_endpoint(pid=HERE.pid), HERE)[0] == "local"


def test_same_process_without_local_falls_back_to_grpc_never_cuda_ipc(gpus_visible):
    backend, why = auto.choose_backend(_endpoint(pid=HERE.pid, uuid="GPU-0", backends=("cuda_ipc", "nccl")), HERE)
    assert backend == "grpc" and "same process" in why


def test_same_node_visible_gpu_takes_cuda_ipc(gpus_visible):
    assert auto.choose_backend(_endpoint(), HERE)[0] == "cuda_ipc"


def test_same_node_hidden_gpu_takes_nccl_and_says_why(gpus_visible):
    backend, why = auto.choose_backend(_endpoint(uuid="GPU-7"), HERE)
    assert backend == "nccl" and "CUDA_VISIBLE_DEVICES" in why


def test_other_node_takes_nccl_when_offered(gpus_visible):
    assert auto.choose_backend(_endpoint(host="node-b"), HERE)[0] == "nccl"


def test_cpu_or_nccl_not_offered_takes_grpc(gpus_visible):
    assert auto.choose_backend(_endpoint(device="cpu", uuid=None), HERE)[0] == "grpc"
    backend, why = auto.choose_backend(_endpoint(host="node-b", backends=("grpc",)), HERE)
    assert backend == "grpc" and "not offered" in why


def test_without_cuda_ipc_or_nccl_tcp_comes_before_grpc(gpus_visible):
    offers = ("local", "grpc", "tcp")
    endpoint = ReceiverEndpoint("r", "node-a", 200, "cpu", tcp_address="node-a:7000", backends=offers)
    backend, why = auto.choose_backend(endpoint, HERE)
    assert backend == "tcp" and "TCP connection" in why
    no_address = ReceiverEndpoint("r", "node-b", 200, "cuda", backends=offers)
    assert auto.choose_backend(no_address, HERE)[0] == "grpc"
