"""KV prefilled by a tensor-parallel engine (real rank processes over gloo, on the tiny model) goes rank to rank to
decode ranks of another TP degree, over real backends on loopback: each decode rank's landed pages are, byte for
byte, its KV heads of the prefill ranks' pages, and, within the rounding that sharding brings, a tp=1 prefill's.

One prefill engine at tp=2 feeds decode workers at tp=1 (tcp) and tp=4 (grpc); the tp=1 engine that gives the
reference pages feeds one at tp=2 (tcp, and local). The decode ranks' receivers (bare KV caches of their heads)
live in this process with the prefill leader, which sends from its layer hook; the follower sends from its own
process once the leader stops it.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch

from splitserve.bench.kv_timing import PagedKV
from splitserve.config import KVTransferConfig
from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.rank_loop import offline_engine
from splitserve.engine.tensor_parallel import rank_kv_heads
from splitserve.kv_transfer import TransferResult, TransferSpec, make_receiver
from splitserve.kv_transfer.head_map import HeadLink, links_to
from splitserve.worker_base import transfer_spec
from tests.kv_transfer.tp_ranks import Route, begin_sends, finish, follower_sends, send_after_prefill

pytestmark = pytest.mark.timeout(300)

BLOCKS, BLOCK_SIZE = 16, 4
PROMPT = torch.randint(0, 256, (27,), generator=torch.Generator().manual_seed(37)).tolist()
DST_BLOCKS = (15, 9, 11, 10, 3, 14, 12)  # 27 tokens in 7 blocks of 4, in another order than the prefill's
# request id: (prefill TP, decode TP, backend)
CASES = {"p2d1": (2, 1, "tcp"), "p2d4": (2, 4, "grpc"), "p1d2": (1, 2, "tcp"), "p1d2-local": (1, 2, "local")}


def _prefill(engine: Engine, request_id: str, hook_for=None) -> list[int]:
    seq = engine.make_sequence(request_id, PROMPT, SamplingParams(max_tokens=4))
    engine.prefill([seq], hook_for)
    return list(seq.block_table)


def _expected(request_id: str, link: HeadLink, layers: int, head_dim: int) -> TransferSpec:
    """What a decode rank expects of one link: built on its side, from its own layout."""
    page = (2, BLOCK_SIZE, len(link.heads), head_dim)
    return TransferSpec(request_id, layers, len(PROMPT), list(DST_BLOCKS), page, "float32", link=link)


@dataclass
class Transferred:
    landed: dict[str, list[torch.Tensor]]  # by case: each decode rank's cache once its transfer is done
    results: dict[str, list[TransferResult]]  # by case: each decode rank's
    prefill: dict[int, list[torch.Tensor]]  # by prefill TP: each rank's cache
    src_blocks: list[int]
    kv_heads: int


@pytest.fixture(scope="module")
def transferred(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ranks")
    config = EngineConfig(
        RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE),
        load_tokenizer=False,
    )
    reference = Engine(config)
    spec = reference.spec
    src_blocks = _prefill(reference, "reference")

    def sink(dst_tp: int, rank: int) -> PagedKV:
        heads = len(rank_kv_heads(spec.num_kv_heads, dst_tp, rank))
        return PagedKV(spec.num_layers, BLOCKS, (BLOCK_SIZE, heads, spec.head_dim), torch.float32, "cpu")

    sinks = {request_id: [sink(d, r) for r in range(d)] for request_id, (_, d, _) in CASES.items()}
    # One receiver per decode rank, each offering every backend; a sender picks the case's.
    receivers = {rid: [make_receiver(KVTransferConfig(), pages) for pages in ranks] for rid, ranks in sinks.items()}
    try:
        routes: dict[int, list[Route]] = {1: [], 2: []}
        landed: dict[str, list[Future[TransferResult]]] = {}
        for request_id, (p, d, backend) in CASES.items():
            ranks = receivers[request_id]
            routes[p].append(Route(request_id, backend, tuple(r.endpoint for r in ranks), DST_BLOCKS))
            expected = [
                [
                    _expected(request_id, link, spec.num_layers, spec.head_dim)
                    for link in links_to(spec.num_kv_heads, p, d, r)
                ]
                for r in range(d)
            ]
            landed[request_id] = [receiver.expect_links(specs) for receiver, specs in zip(ranks, expected, strict=True)]

        send_after_prefill(reference.runner, routes[1], src_blocks, len(PROMPT))
        done = functools.partial(
            follower_sends, routes=routes[2], src_blocks=src_blocks, num_tokens=len(PROMPT), directory=str(directory)
        )
        with offline_engine(config, 2, done) as engine:
            begun: list = []

            def hook_for(completing):
                """The leader streams its links from the layer hook, each layer as soon as it is computed."""
                if not completing:
                    return None
                (seq,) = completing
                begun.extend(begin_sends(engine.runner, routes[2], list(seq.block_table), len(PROMPT)))

                def on_layer(layer: int) -> None:
                    for send in begun[0]:
                        send.send_layer(layer)

                return on_layer

            assert _prefill(engine, "tp2", hook_for) == src_blocks  # the same scheduler: the same blocks
            finish(*begun)
            leader = engine.runner.kv_cache.clone()
        yield Transferred(
            landed={rid: [s.kv_cache for s in ranks] for rid, ranks in sinks.items()},
            results={rid: [future.result(timeout=60) for future in futures] for rid, futures in landed.items()},
            prefill={1: [reference.runner.kv_cache], 2: [leader, torch.load(directory / "rank1.pt")["kv_cache"]]},
            src_blocks=src_blocks,
            kv_heads=spec.num_kv_heads,
        )
    finally:
        for ranks in receivers.values():
            for receiver in ranks:
                receiver.close()


@pytest.mark.parametrize("request_id", list(CASES))
def test_each_decode_rank_lands_its_heads_of_the_prefill_ranks_pages(transferred, request_id):
    p, d, backend = CASES[request_id]
    kv_heads, src_blocks = transferred.kv_heads, transferred.src_blocks
    assert [result.backend for result in transferred.results[request_id]] == [backend] * d
    reference = transferred.prefill[1][0][:, :, src_blocks]
    assert reference.abs().sum() > 0
    for rank in range(d):
        pages = transferred.landed[request_id][rank][:, :, list(DST_BLOCKS)]
        for link in links_to(kv_heads, p, d, rank):
            sent = transferred.prefill[p][link.src_rank][:, :, src_blocks]
            here = slice(None) if link.dst_slice is None else link.dst_slice
            there = slice(None) if link.src_slice is None else link.src_slice
            assert torch.equal(pages[..., here, :], sent[..., there, :])  # byte for byte, what the sender held
        heads = rank_kv_heads(kv_heads, d, rank)
        # Against the unsharded prefill: the tolerance of tests/engine/test_tensor_parallel.py (row-parallel sums
        # add in another order); exact where the prefill was tp=1.
        torch.testing.assert_close(pages, reference[..., heads.start : heads.stop, :], rtol=1e-5, atol=1e-5)
        if p == 1:
            assert torch.equal(pages, reference[..., heads.start : heads.stop, :])


def test_a_rank_refuses_to_build_the_spec_of_a_link_that_neither_starts_nor_ends_at_it(tiny_model_dir):
    runner = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=4))).runner
    (link,) = links_to(runner.spec.num_kv_heads, 2, 4, 3)  # a head of prefill rank 1 to decode rank 3, both tp > 1
    with pytest.raises(ValueError, match=r"link: KV heads 1 of 2 .* neither starts nor ends at this rank"):
        transfer_spec(runner, "r", 8, [0, 1], link)
    (one,) = links_to(runner.spec.num_kv_heads, 1, 2, 1)  # from this tp=1 rank: the spec carries one head
    assert transfer_spec(runner, "r", 8, [0, 1], one).page_shape == (2, runner.block_size, 1, runner.spec.head_dim)
