"""Both ends over real transports on 127.0.0.1: bytes, chunking, checksum, compression."""

from __future__ import annotations

import pytest
import torch

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import IntegrityError, make_receiver, make_sender, wire
from splitserve.kv_transfer.tcp import TcpLink
from tests.kv_transfer.helpers import FakeRunner, pages_equal, send_all, transfer

SRC_BLOCKS = [3, 0, 7, 5]
DST_BLOCKS = [9, 2, 14, 6]  # non-contiguous, unsorted


@pytest.mark.parametrize("backend", ["local", "grpc", "tcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_arrive_bit_exact(backend, dtype):
    src, dst = FakeRunner(dtype=dtype, seed=1), FakeRunner(dtype=dtype, seed=2)
    untouched = dst.gather_pages(0, [1, 3])
    sent, result = transfer(KVTransferConfig(backend=backend, checksum=True), src, dst, SRC_BLOCKS, DST_BLOCKS)
    assert pages_equal(src, SRC_BLOCKS, dst, DST_BLOCKS)
    assert torch.equal(dst.gather_pages(0, [1, 3]), untouched)  # nothing outside the reserved pages
    layer_bytes = src.gather_pages(0, SRC_BLOCKS).numel() * dtype.itemsize
    assert sent == result.bytes == layer_bytes * src.num_layers


def test_layer_larger_than_chunk_is_split(monkeypatch):
    src, dst = (
        FakeRunner(blocks=64, block_size=16, heads=2, dim=16),
        FakeRunner(blocks=64, block_size=16, heads=2, dim=16),
    )
    blocks = list(range(40, 8, -1))  # 32 blocks: 2*32*16*2*16*4 = 131 kB per layer
    chunks = []
    real_chunk = wire.chunk
    monkeypatch.setattr(wire, "chunk", lambda *a: chunks.append(len(a[3])) or real_chunk(*a))
    cfg = KVTransferConfig(backend="grpc", chunk_bytes=32 << 10)
    receiver = make_receiver(cfg, dst)
    try:
        done = receiver.expect(dst.spec("big", blocks))
        handle = make_sender(cfg, receiver.endpoint).begin(src.spec("big", blocks))
        send_all(handle, src, blocks)
        handle.finish()
        done.result(timeout=5)
    finally:
        receiver.close()
    assert pages_equal(src, blocks, dst, blocks)
    assert len(chunks) == src.num_layers * 4 and max(chunks) == 32 << 10


def _flip_last_byte_of_layer_1(backend: str, monkeypatch) -> None:
    """Corrupt the wire: the last byte of layer 1's payload, where each backend hands it to its transport."""
    if backend == "grpc":
        real_chunk = wire.chunk

        def chunk(layer, offset, total, payload):
            data = bytearray(payload)
            if layer == 1 and offset + len(data) == total:
                data[-1] ^= 0x01
            return real_chunk(layer, offset, total, memoryview(data))

        monkeypatch.setattr(wire, "chunk", chunk)
    else:
        real_send = TcpLink.send

        def send(self, key, layer, payload):
            data = bytearray(payload)
            if layer == 1:
                data[-1] ^= 0x01
            real_send(self, key, layer, memoryview(data))

        monkeypatch.setattr(TcpLink, "send", send)


def _assert_refused_on_both_ends(cfg: KVTransferConfig, sent_blocks: list[int], match: str | None = None) -> None:
    """Send the source's pages into a receiver expecting DST_BLOCKS: both the sender and the receiver must fail."""
    src, dst = FakeRunner(), FakeRunner()
    receiver = make_receiver(cfg, dst)
    try:
        done = receiver.expect(dst.spec("bad", DST_BLOCKS))
        handle = make_sender(cfg, receiver.endpoint).begin(src.spec("bad", sent_blocks))
        send_all(handle, src, SRC_BLOCKS[: len(sent_blocks)])
        with pytest.raises(IntegrityError, match=match):
            handle.finish()
        with pytest.raises(IntegrityError):
            done.result(timeout=5)
    finally:
        receiver.close()


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_corrupted_byte_is_detected(backend, monkeypatch):
    _flip_last_byte_of_layer_1(backend, monkeypatch)
    _assert_refused_on_both_ends(KVTransferConfig(backend=backend, checksum=True), DST_BLOCKS, match="checksum")


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_layout_mismatch_is_refused(backend):
    _assert_refused_on_both_ends(KVTransferConfig(backend=backend), DST_BLOCKS[:-1])


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
@pytest.mark.parametrize(("compression", "max_rel"), [("int8", 1 / 127), ("fp8", 1 / 8)])
def test_compression_error_is_bounded(backend, compression, max_rel):
    if compression == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    src, dst = FakeRunner(dtype=torch.bfloat16, seed=3), FakeRunner(dtype=torch.bfloat16, seed=4)
    sent, _ = transfer(
        KVTransferConfig(backend=backend, compression=compression, checksum=True), src, dst, SRC_BLOCKS, DST_BLOCKS
    )
    for layer in range(src.num_layers):
        a = src.gather_pages(layer, SRC_BLOCKS).float()
        b = dst.gather_pages(layer, DST_BLOCKS).float()
        absmax = a.abs().amax(dim=(2, 3, 4), keepdim=True)  # one scale per (K|V, block)
        # half a quantization step of the block's scale, plus bf16 rounding of the result
        assert ((a - b).abs() <= absmax * max_rel + a.abs() * 2**-7 + 1e-6).all()
        assert not torch.equal(a, b) or compression == "fp8"
    raw = src.gather_pages(0, SRC_BLOCKS).numel() * 2 * src.num_layers
    assert sent < raw * 0.6  # 1 byte per value instead of 2, plus the scales


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_transfers_of_many_sizes_through_one_receiver(backend):
    """tcp reuses staging memory across transfers on a CPU sink: larger, smaller and equal ones all land exact."""
    src, dst = FakeRunner(blocks=64, seed=5), FakeRunner(blocks=64, seed=6)
    cfg = KVTransferConfig(backend=backend)
    receiver = make_receiver(cfg, dst)
    sender = make_sender(cfg, receiver.endpoint)
    g = torch.Generator().manual_seed(0)
    try:
        for i, n in enumerate([20, 5, 30, 7, 7, 3, 40, 12]):
            blocks = torch.randperm(64, generator=g)[:n].tolist()
            done = receiver.expect(dst.spec(f"s{i}", blocks))
            handle = sender.begin(src.spec(f"s{i}", blocks))
            send_all(handle, src, blocks)
            handle.finish()
            done.result(timeout=5)
            assert pages_equal(src, blocks, dst, blocks), n
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_the_receiver_completes_once_every_layer_is_sent(backend):
    """The decode side may admit while the prefill pass still samples: END follows the last layer, not finish()."""
    src, dst = FakeRunner(seed=1), FakeRunner(seed=2)
    cfg = KVTransferConfig(backend=backend)
    receiver = make_receiver(cfg, dst)
    sender = make_sender(cfg, receiver.endpoint)
    try:
        done = receiver.expect(dst.spec("r1", DST_BLOCKS))
        handle = sender.begin(src.spec("r1", DST_BLOCKS))
        send_all(handle, src, SRC_BLOCKS, layers=range(src.num_layers - 1))
        with pytest.raises(TimeoutError):
            done.result(timeout=0.3)  # a layer is still missing
        send_all(handle, src, SRC_BLOCKS, layers=[src.num_layers - 1])
        done.result(timeout=5)  # no finish() yet
        assert pages_equal(src, SRC_BLOCKS, dst, DST_BLOCKS)
        assert handle.finish() > 0
    finally:
        sender.close()
        receiver.close()
