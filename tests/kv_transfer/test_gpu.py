"""cuda_ipc and nccl need real GPUs and a second process; they skip cleanly on CPU-only machines."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

from splitserve.config import KVTransferConfig
from splitserve.engine.host_copy import index_tensor
from splitserve.kv_transfer import make_receiver, make_sender
from splitserve.kv_transfer.cuda_ipc import IpcWriter
from splitserve.kv_transfer.deferred import DeferredSend
from tests.kv_transfer.helpers import FakeRunner, pages_equal, send_all, transfer

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


def _send_deferred(backend: str, endpoint, device: str, results) -> None:
    """Child process: the prefill side before the pages are known. Two layers are gathered on a side stream behind
    a ~50 ms kernel (as a replayed prompt graph's hooks run long before its layers are done) and kept; another
    thread opens the transfer meanwhile; the engine's thread sends the rest."""
    torch.cuda.set_device(torch.device(device))
    src = _on(device, seed=1)
    sender = make_sender(KVTransferConfig(backend=backend), endpoint, device)
    handle = DeferredSend(lambda blocks: sender.begin(src.spec("g", blocks)), timeout_s=60)
    late = torch.cuda.Stream()
    with torch.cuda.stream(late):
        torch.cuda._sleep(100_000_000)
        send_all(handle, src, BLOCKS, layers=[0, 1])
    opener = threading.Thread(target=handle.open, args=(BLOCKS,))
    opener.start()
    opener.join()
    send_all(handle, src, BLOCKS, layers=range(2, src.num_layers))
    results.put(handle.finish())


def _roundtrip(backend: str, src_device: str, dst_device: str, send=_send) -> None:
    dst = _on(dst_device, seed=2)
    receiver = make_receiver(KVTransferConfig(backend=backend), dst)
    try:
        done = receiver.expect(dst.spec("g", BLOCKS))
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=send, args=(backend, receiver.endpoint, src_device, results))
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
    transfer(KVTransferConfig(backend=backend, checksum=True), src, dst, BLOCKS, BLOCKS, "cuda")
    assert pages_equal(src, BLOCKS, dst, BLOCKS)


@needs_cuda
def test_cuda_ipc_across_processes():
    _roundtrip("cuda_ipc", "cuda:0", "cuda:0")


@needs_cuda
def test_layers_kept_until_the_pages_are_known_land_intact_over_cuda_ipc():
    _roundtrip("cuda_ipc", "cuda:0", "cuda:0", send=_send_deferred)


@needs_cuda
def test_cuda_ipc_writer_scatters_with_an_index_ready_on_its_own_stream():
    """A deferred transfer is begun on a worker's loop thread, whose current stream may be queued behind a whole
    prefill pass: the writer's scatter must not read a destination index still on its way through that stream (a
    prefill worker on an H100 died of an index_copy_ assert)."""
    src, dst = _on("cuda", 1), _on("cuda", 2)
    gather, side = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(gather):
        pages = src.gather_pages(0, BLOCKS)
    # A first write loads the kernels and grows the allocator, either of which may synchronize the whole device:
    # done here, before the default stream is made busy, the timed write below can only wait on it by its streams.
    warm = IpcWriter(dst.kv_cache, dst.spec("warm", BLOCKS), side)
    warm.ready()
    with torch.cuda.stream(gather):
        warm.prepare(1, pages)
    warm.drain()
    stale = [index_tensor([0] * len(BLOCKS), dst.device) for _ in range(256)]
    untouched = dst.gather_pages(0, [0])  # block 0 is no destination: a stale index of zeros would write it
    torch.cuda.synchronize()
    del stale  # an index allocated on the default stream now likely reads zeros until its copy lands
    torch.cuda._sleep(2_000_000_000)  # on the default stream, this thread's current one
    writer = IpcWriter(dst.kv_cache, dst.spec("w", BLOCKS), side)
    writer.ready()
    with torch.cuda.stream(gather):
        assert writer.prepare(0, pages) is None  # READY came: handed to the issuer at once
    writer.drain()
    assert not torch.cuda.default_stream().query(), "the default stream was idle: nothing was tested"
    torch.cuda.synchronize()
    assert torch.equal(dst.gather_pages(0, BLOCKS), src.gather_pages(0, BLOCKS))
    assert torch.equal(dst.gather_pages(0, [0]), untouched)


@needs_cuda
def test_a_stopped_cuda_ipc_writer_waits_for_the_copies_of_done_layers_only():
    """A stop is answered once the copies already running are done, not once the prefill pass has run: a layer the
    device is still computing is never copied, so its copy is not waited for."""
    src, dst = _on("cuda", 1), _on("cuda", 2)
    side, pass_stream = torch.cuda.Stream(), torch.cuda.Stream()
    before = dst.kv_cache.clone()
    writer = IpcWriter(dst.kv_cache, dst.spec("s", BLOCKS), side)
    writer.ready()
    writer.prepare(0, src.gather_pages(0, BLOCKS))
    deadline = time.monotonic() + 60
    while writer.end_fields()["layers"] != [0]:  # layer 0 is done: the issuer copies it soon
        assert time.monotonic() < deadline, "layer 0 was never copied"
        time.sleep(0.001)
    with torch.cuda.stream(pass_stream):
        torch.cuda._sleep(2_000_000_000)  # the rest of the pass
        writer.prepare(1, src.gather_pages(1, BLOCKS))
    writer.halt()
    writer.drain()
    assert not pass_stream.query(), "the pass ended first: nothing was tested"
    torch.cuda.synchronize()
    assert writer.end_fields() == {"layers": [0]}
    assert torch.equal(dst.gather_pages(0, BLOCKS), src.gather_pages(0, BLOCKS))
    assert torch.equal(dst.kv_cache[1:], before[1:])


def _send_slowly(endpoint, device: str, results, go_on) -> None:
    """Child process: one layer, then wait for the parent, then the rest."""
    from splitserve.kv_transfer import TransferError

    torch.cuda.set_device(torch.device(device))
    src = _on(device, seed=1)
    handle = make_sender(KVTransferConfig(backend="cuda_ipc"), endpoint, device).begin(src.spec("slow", BLOCKS))
    handle.send_layer(0, src.gather_pages(0, BLOCKS))
    results.put("began")
    go_on.wait(60)
    send_all(handle, src, BLOCKS, layers=range(1, src.num_layers))
    try:
        handle.finish()
        results.put("ok")
    except TransferError as err:
        results.put(type(err).__name__)


@needs_cuda
def test_cuda_ipc_receiver_abort_frees_pages_only_once_the_sender_stopped():
    """The sender writes the receiver's pages itself: after an abort, ``unwritten`` says when they are safe to
    reuse, and nothing the sender does afterwards (it goes on with its prefill) touches them."""
    dst = _on("cuda:0", seed=2)
    receiver = make_receiver(KVTransferConfig(backend="cuda_ipc"), dst)
    try:
        receiver.expect(dst.spec("slow", BLOCKS))
        ctx = mp.get_context("spawn")
        results, go_on = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=_send_slowly, args=(receiver.endpoint, "cuda:0", results, go_on))
        child.start()
        assert results.get(timeout=120) == "began"
        assert receiver.abort("slow", "decode side gave up")
        receiver.unwritten("slow").result(timeout=30)
        torch.cuda.synchronize()
        settled = dst.kv_cache.clone()
        go_on.set()
        assert results.get(timeout=60) == "TransferAborted"
        child.join(timeout=30)
        torch.cuda.synchronize()
        assert torch.equal(dst.kv_cache, settled)
    finally:
        receiver.close()


@needs_two_gpus
@pytest.mark.multigpu
def test_nccl_across_gpus():
    _roundtrip("nccl", "cuda:1", "cuda:0")


@needs_two_gpus
@pytest.mark.multigpu
def test_layers_kept_until_the_pages_are_known_land_intact_over_nccl():
    _roundtrip("nccl", "cuda:1", "cuda:0", send=_send_deferred)


# One pair carries every scenario in turn, so each one also proves the pair is still in step after the last.
_PAIR_SCENARIOS = ["interleaved", "sender_abort", "refused", "short", "after"]


def _send_scenarios(endpoint, results) -> None:
    """Child process: the prefill side of _PAIR_SCENARIOS."""
    from splitserve.kv_transfer import TransferError

    torch.cuda.set_device("cuda:1")
    src = _on("cuda:1", seed=1)
    sender = make_sender(KVTransferConfig(backend="nccl", timeout_s=20), endpoint, "cuda:1")

    def outcome(handle) -> str:
        try:
            handle.finish()
            return "ok"
        except TransferError as err:
            return type(err).__name__

    # Two transfers begun together, layers interleaved as a batched prefill produces them.
    a, b = sender.begin(src.spec("interleaved-a", BLOCKS)), sender.begin(src.spec("interleaved-b", [2, 3]))
    for layer in range(src.num_layers):
        a.send_layer(layer, src.gather_pages(layer, BLOCKS))
        b.send_layer(layer, src.gather_pages(layer, [0, 5]))
    results.put(("interleaved", [outcome(b), outcome(a)]))
    c = sender.begin(src.spec("sender_abort", BLOCKS))
    c.send_layer(0, src.gather_pages(0, BLOCKS))
    c.abort("client cancelled")
    results.put(("sender_abort", [outcome(c)]))
    d = sender.begin(src.spec("refused", BLOCKS))  # the receiver aborted it before it began
    send_all(d, src, BLOCKS)
    results.put(("refused", [outcome(d)]))
    e = sender.begin(src.spec("short", BLOCKS))
    send_all(e, src, BLOCKS, layers=range(src.num_layers - 1))
    results.put(("short", [outcome(e)]))
    f = sender.begin(src.spec("after", [6, 7, 8]))
    send_all(f, src, BLOCKS)
    results.put(("after", [outcome(f)]))


@needs_two_gpus
@pytest.mark.multigpu
def test_nccl_pair_stays_in_step():
    """Interleaved transfers land in the right pages; aborts, refusals and short transfers fail cleanly and never
    desynchronise the pair for the transfers after them."""
    from splitserve.kv_transfer import IntegrityError, TransferAborted

    dst = _on("cuda:0", seed=2)
    receiver = make_receiver(KVTransferConfig(backend="nccl", timeout_s=20), dst)
    try:
        futures = {
            "interleaved-a": receiver.expect(dst.spec("interleaved-a", BLOCKS)),
            "interleaved-b": receiver.expect(dst.spec("interleaved-b", [2, 3])),
            **{name: receiver.expect(dst.spec(name, BLOCKS)) for name in ["sender_abort", "refused", "short"]},
            "after": receiver.expect(dst.spec("after", [6, 7, 8])),
        }
        receiver.abort("refused", "decode side gave up")
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_send_scenarios, args=(receiver.endpoint, results))
        child.start()
        seen = {}
        for _ in _PAIR_SCENARIOS:
            got, outcomes = results.get(timeout=120)
            seen[got] = outcomes
        child.join(timeout=30)
        assert seen == {
            "interleaved": ["ok", "ok"],
            "sender_abort": ["TransferAborted"],
            "refused": ["TransferAborted"],
            "short": ["IntegrityError"],
            "after": ["ok"],
        }
        for name in ["interleaved-a", "interleaved-b", "after"]:
            futures[name].result(timeout=10)
        for name, err in [("sender_abort", TransferAborted), ("refused", TransferAborted), ("short", IntegrityError)]:
            with pytest.raises(err):
                futures[name].result(timeout=10)
    finally:
        receiver.close()
    src = _on("cuda:1", seed=1)
    assert pages_equal(src, BLOCKS, dst, BLOCKS)
    assert pages_equal(src, [0, 5], dst, [2, 3])
    assert pages_equal(src, BLOCKS, dst, [6, 7, 8])
