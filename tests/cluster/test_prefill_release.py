"""A prefill worker frees a finished transfer's pages between two layers of the pass in flight, not after it:
under load a pass is the longest wait there is (hundreds of ms for a full token budget)."""

from __future__ import annotations

from collections.abc import Callable

from splitserve.cluster.messages import GenerateRequest
from splitserve.cluster.worker_options import options_for
from splitserve.engine import SamplingParams
from splitserve.kv_transfer import ReceiverEndpoint
from splitserve.prefill_worker.worker import PrefillWorker, _Job
from tests.support import tiny_cluster_config


def test_finished_transfer_pages_come_back_after_the_next_layer(tiny_model_dir):
    config = tiny_cluster_config(tiny_model_dir)
    worker = PrefillWorker("prefill-0", options_for(config, config.prefill, str(tiny_model_dir)))

    def on_engine(call: Callable[[], object]) -> None:  # passes run on the engine thread, which holds the engine
        worker._thread.submit(call).result(timeout=60)

    try:
        engine = worker.engine
        free = engine.blocks.num_free
        params = SamplingParams(max_tokens=8)  # more than the first token: the pages wait for a transfer
        # A prompt already prefilled, whose transfer has just ended: its pages are still held.
        done = engine.make_sequence("job-done", list(range(40)), params)
        on_engine(lambda: engine.prefill([done]))
        assert engine.blocks.num_free < free
        request = GenerateRequest("r-done", list(range(40)), params)
        endpoint = ReceiverEndpoint("nobody", "localhost", 0, "cpu", backends=("grpc",))
        worker._to_free.append(_Job(request, endpoint, key="job-done"))

        # The next pass: watch the free pages after each of its layers.
        free_after_layer: list[int] = []
        hook = worker._layer_hook([], {})

        def watching(layer: int) -> None:
            hook(layer)
            free_after_layer.append(engine.blocks.num_free)

        running = engine.make_sequence("job-next", list(range(100, 160)), params)
        on_engine(lambda: engine.prefill([running], hook_for=lambda completing: watching))
        assert len(free_after_layer) == engine.spec.num_layers > 1
        assert free_after_layer[0] == free - len(running.block_table)  # back after layer 0, mid-pass
        assert "r-done" in worker.releases.snapshot()
    finally:
        worker._thread.stop()
