"""cuda_ipc and nccl need real GPUs and a second process; they skip cleanly on CPU-only machines."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import make_receiver, make_sender
from tests.kv_transfer.helpers import FakeRunner, pages_equal, send_all

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)
BLOCKS = [4, 1, 9]


def _on(device: str, seed: int) -> FakeRunner:
    runner = FakeRunner(dtype=torch.bfloat16, seed=seed)
    runner.kv_cache = runner.kv_cache.to(device)
    runner.kv_layers = list(runner.kv_cache.unbind(0))
    runner.device = torch.device(device)
    return runner


def _send(backend: str, endpoint, device: str, results) -> None:
    """Child process: the prefill side."""
    torch.cuda.set_device(torch.device(device))
    src = _on(device, seed=1)
    handle = make_sender(KVTransferConfig(backend=backend), endpoint, device).begin(src.spec("g", BLOCKS))
    send_all(handle, src, BLOCKS)
    results.put(handle.finish())


def _roundtrip(backend: str, src_device: str, dst_device: str) -> None:
    dst = _on(dst_device, seed=2)
    receiver = make_receiver(KVTransferConfig(backend=backend), dst)
    try:
        done = receiver.expect(dst.spec("g", BLOCKS))
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_send, args=(backend, receiver.endpoint, src_device, results))
        child.start()
        assert results.get(timeout=120) > 0
        child.join(timeout=30)
        done.result(timeout=30)
    finally:
        receiver.close()
    assert pages_equal(_on(src_device, seed=1), BLOCKS, dst, BLOCKS)


@needs_cuda
@pytest.mark.parametrize("backend", ["local", "grpc"])
def test_same_process_on_gpu(backend):
    src, dst = _on("cuda", 1), _on("cuda", 2)
    cfg = KVTransferConfig(backend=backend, checksum=True)
    receiver = make_receiver(cfg, dst)
    try:
        done = receiver.expect(dst.spec("s", BLOCKS))
        handle = make_sender(cfg, receiver.endpoint, "cuda").begin(src.spec("s", BLOCKS))
        send_all(handle, src, BLOCKS)
        handle.finish()
        done.result(timeout=10)
    finally:
        receiver.close()
    assert pages_equal(src, BLOCKS, dst, BLOCKS)


@needs_cuda
def test_cuda_ipc_across_processes():
    _roundtrip("cuda_ipc", "cuda:0", "cuda:0")


@needs_two_gpus
@pytest.mark.multigpu
def test_nccl_across_gpus():
    _roundtrip("nccl", "cuda:1", "cuda:0")
