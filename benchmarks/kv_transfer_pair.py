"""The backends that need the receiver in a second process, each next to its baseline in the same run:
``nccl`` between two GPUs (baseline: plain NCCL send/recv between the same two processes) and, with
``--overlap-prompt``, how much of the layer-wise stream prefill compute hides on an 8B model; ``cuda_ipc`` on one GPU
(baseline: a device-to-device copy of the same bytes; CUDA cannot open an IPC handle in the process that made it).

This process sends from cuda:0; a spawned one receives (on cuda:1 for nccl, cuda:0 for cuda_ipc). Run through
``kv_transfer.py --nccl`` or ``kv_transfer.py --cuda-ipc``.
"""

from __future__ import annotations

import queue
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve import handoff_trace
from splitserve.bench.kv_timing import PagedKV
from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import TransferSpec, make_receiver, make_sender

SENDER = "cuda:0"
REPLY_TIMEOUT_S = 300


def _plain_pair(store: dist.Store, rank: int) -> dist.ProcessGroupNCCL:
    return dist.ProcessGroupNCCL(dist.PrefixStore("plain/", store), rank, 2, dist.ProcessGroupNCCL.Options())


def _receiver_main(commands: Any, replies: Any, backend: str, device: str) -> None:
    """The receiving process: builds KV caches and receivers on request, and runs the plain p2p baseline."""
    torch.cuda.set_device(device)
    receiver = None
    landed: dict[str, Any] = {}  # request id -> its future and when it resolved (when decode could admit)
    while True:
        command, *args = commands.get()
        if command == "stop":
            break
        if command == "open":
            layers, blocks, page, dtype_name = args
            if receiver is not None:
                receiver.close()
            sink = PagedKV(layers, blocks, page, getattr(torch, dtype_name), device)
            receiver = make_receiver(KVTransferConfig(backend=backend), sink)
            replies.put(receiver.endpoint)
        elif command == "expect":
            assert receiver is not None
            stamped: queue.SimpleQueue[float] = queue.SimpleQueue()
            future = receiver.expect(args[0])  # the sender's finish() returns once the receiver landed every layer
            future.add_done_callback(lambda _, stamped=stamped: stamped.put(time.perf_counter()))
            landed[args[0].request_id] = (future, stamped)
            replies.put("ready")
        elif command == "landed":  # perf_counter is CLOCK_MONOTONIC, one clock for both processes
            future, stamped = landed.pop(args[0])
            stamp = stamped.get(timeout=REPLY_TIMEOUT_S)
            future.result()  # a failed transfer raises here, not as a time
            replies.put(stamp)
        elif command == "plain":
            host, port, nbytes, rounds = args
            store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))
            group = _plain_pair(store, 1)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            ack = torch.zeros(1, device=device)
            for _ in range(rounds):
                group.recv([buf], 0, 0).wait()  # type: ignore[attr-defined]
                group.send([ack], 0, 0).wait()  # type: ignore[attr-defined]
            torch.cuda.synchronize()
            replies.put("done")


class Pair:
    """The two processes; commands go to the receiver over a queue."""

    def __init__(self, backend: str, receiver_device: str) -> None:
        self.backend = backend
        self.config = KVTransferConfig(backend=backend)
        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        args = (self.commands, self.replies, backend, receiver_device)
        self.child = ctx.Process(target=_receiver_main, args=args, daemon=True)
        self.child.start()
        torch.cuda.set_device(SENDER)

    def ask(self, *command: Any) -> Any:
        self.commands.put(command)
        return self.replies.get(timeout=REPLY_TIMEOUT_S)

    def close(self) -> None:
        self.commands.put(("stop",))
        self.child.join(timeout=60)


def device_copy_seconds(pair: Pair, nbytes: int, repeats: int) -> float:
    """Best device-to-device copy of ``nbytes`` on the sender's GPU: what cuda_ipc's copies are bounded by."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=SENDER)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def plain_p2p_seconds(pair: Pair, nbytes: int, repeats: int) -> float:
    """Best round of: send ``nbytes`` as one tensor, receive a 1-element ack (the ack makes it a delivery time)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    pair.commands.put(("plain", "127.0.0.1", store.port, nbytes, repeats + 1))
    group = _plain_pair(store, 0)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=SENDER)
    ack = torch.empty(1, device=SENDER)
    times = []
    for _ in range(repeats + 1):  # the first round sets the communicator up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        group.send([buf], 1, 0).wait()  # type: ignore[attr-defined]
        group.recv([ack], 1, 0).wait()  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert pair.replies.get(timeout=REPLY_TIMEOUT_S) == "done"
    return min(times[1:])


def backend_seconds(pair: Pair, endpoint: Any, src: PagedKV, repeats: int) -> float:
    """Best time of a whole transfer through the pair's backend, layer by layer, until the receiver has it all."""
    sender = make_sender(pair.config, endpoint, SENDER)
    times = []
    try:
        for i in range(repeats + 1):  # the first transfer sets the pair (communicator, IPC mapping) up
            spec = src.spec(f"{pair.backend}-{i}")
            assert pair.ask("expect", spec) == "ready"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = sender.begin(spec)
            for layer in range(src.layers):
                handle.send_layer(layer, src.kv_layers[layer])
            handle.finish()
            times.append(time.perf_counter() - t0)
    finally:
        sender.close()
    return min(times[1:])


def ipc_copy_seconds(endpoint: Any, src: PagedKV, repeats: int, by_index: bool = False) -> float:
    """cuda_ipc's data path alone: the same per-layer scatter into the receiver's pages through its IPC handle,
    without the protocol around it (what ``backend_seconds`` adds on top is the control path). ``by_index``
    selects the (consecutive) blocks with an index tensor, as every transfer did before runs became slices."""
    from splitserve.engine.host_copy import index_tensor
    from splitserve.engine.page_copy import scatter_pages, select_blocks
    from splitserve.kv_transfer.cuda_ipc import open_kv_cache

    remote = open_kv_cache(endpoint.ipc_handle)
    ids = list(range(src.blocks))
    blocks = index_tensor(ids, remote.device) if by_index else select_blocks(ids, remote.device)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(src.layers):
            scatter_pages(remote[layer], blocks, src.kv_layers[layer])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


BASELINES = {"nccl": ("plain NCCL send/recv", plain_p2p_seconds), "cuda_ipc": ("device copy", device_copy_seconds)}


def transfer_rows(pair: Pair, sizes_mb: list[float], dtype: torch.dtype, repeats: int) -> list[dict]:
    baseline, baseline_seconds = BASELINES[pair.backend]
    rows = []
    for mb in sizes_mb:
        src = PagedKV.sized(mb, dtype, SENDER)
        nbytes = src.kv_cache.numel() * src.kv_cache.element_size()
        endpoint = pair.ask("open", src.layers, src.blocks, src.page, str(src.dtype).removeprefix("torch."))
        ours = backend_seconds(pair, endpoint, src, repeats)
        base = baseline_seconds(pair, nbytes, repeats)
        row = {
            "size_mb": nbytes / 1e6,
            "backend": pair.backend,
            "layers": src.layers,
            "gb_per_s": nbytes / ours / 1e9,
            "transfer_ms": ours * 1e3,
            "baseline": baseline,
            "baseline_gb_per_s": nbytes / base / 1e9,
            "ratio": base / ours,
        }
        line = (
            f"{row['size_mb']:8.1f} MB  {pair.backend} {row['gb_per_s']:7.1f} GB/s ({ours * 1e3:.2f} ms)   "
            f"{baseline} {row['baseline_gb_per_s']:7.1f} GB/s   ratio {row['ratio']:.2f}"
        )
        if pair.backend == "cuda_ipc":
            path = ipc_copy_seconds(endpoint, src, repeats)
            indexed = ipc_copy_seconds(endpoint, src, repeats, by_index=True)
            row.update(
                data_path_gb_per_s=nbytes / path / 1e9,
                data_path_ratio=base / path,
                data_path_by_index_ratio=base / indexed,
                control_ms=(ours - path) * 1e3,
            )
            line += (
                f"   data path alone {row['data_path_gb_per_s']:7.1f} GB/s (ratio {row['data_path_ratio']:.2f}; "
                f"by index {row['data_path_by_index_ratio']:.2f})"
            )
        rows.append(row)
        print(line, flush=True)
    return rows


def overlap(pair: Pair, prompt_len: int, repeats: int, prompt_graphs: bool = True) -> dict:
    """Prefill of one ``prompt_len`` prompt on an 8B Llama-3 shape, alone and with its KV streamed layer by layer to
    the receiver: the share of the transfer that stays hidden behind compute. Prompts up to the engine's
    ``prompt_graph_tokens`` replay a CUDA graph (the layer hook runs on each layer's event), unless ``prompt_graphs``
    is off (an eager pass, the hook called between layers)."""
    from splitserve.bench.make_random_checkpoint import llama_config
    from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams

    engine = Engine(
        EngineConfig(
            RunnerConfig(
                model_dir=None,
                device=SENDER,
                max_batch_tokens=max(prompt_len, 2048),
                num_kv_blocks=2 * -(-prompt_len // 16),
                decode_graphs=False,  # as on a prefill worker: prompts up to prompt_graph_tokens replay a graph
                prompt_graph_tokens=RunnerConfig.prompt_graph_tokens if prompt_graphs else 0,
            ),
            enable_prefix_caching=False,
        ),
        hf_config=llama_config("llama3-8b"),
    )
    runner = engine.runner
    blocks = engine.blocks.blocks_for(prompt_len)
    block, heads, dim = runner.page_shape[1:]
    endpoint = pair.ask("open", runner.spec.num_layers, blocks, (block, heads, dim), "bfloat16")
    sender = make_sender(pair.config, endpoint, SENDER)
    prompt = [(7 * j) % 1000 for j in range(prompt_len)]

    def spec_of(request_id: str) -> TransferSpec:
        layers = runner.spec.num_layers
        return TransferSpec(request_id, layers, prompt_len, list(range(blocks)), runner.page_shape, "bfloat16")

    def prefill(stream: bool, only_transfer: bool = False) -> tuple[float, float, float]:
        """Seconds until the sender's finish() returned, until the receiver's expectation resolved (the moment
        decode could admit the request, one control message before finish() hears of it), and until the layers were
        all sent (prefill returned, or the last send_layer did)."""
        seq = engine.make_sequence("p", prompt, SamplingParams(max_tokens=2, ignore_eos=True))  # 1 frees at once
        handle = None
        spec = None
        if stream or only_transfer:
            spec = spec_of(f"o-{time.perf_counter_ns()}")
            assert pair.ask("expect", spec) == "ready"
        if only_transfer:
            engine.prefill([seq])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if only_transfer:
            handle = sender.begin(spec)
            for layer in range(runner.spec.num_layers):
                handle.send_layer(layer, runner.gather_pages(layer, seq.block_table))
        else:

            def hook_for(completing):
                nonlocal handle
                if not stream:
                    return None
                handoff_trace.mark("prefill.transfer_begin", spec.request_id)
                handle = sender.begin(spec)
                index = runner.block_index(seq.block_table)

                def on_layer(layer: int) -> None:
                    handle.send_layer(layer, runner.gather_pages(layer, index))
                    if layer == runner.spec.num_layers - 1:
                        handoff_trace.mark("prefill.last_layer", spec.request_id)

                return on_layer

            engine.prefill([seq], hook_for=hook_for)
            if spec is not None:
                handoff_trace.mark("prefill.first_token", spec.request_id)
        sent = time.perf_counter() - t0
        if handle is not None:
            handle.finish()
            handoff_trace.mark("prefill.transfer_done", spec.request_id)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        admit = seconds if spec is None else pair.ask("landed", spec.request_id) - t0
        engine.release(seq.request_id)
        return seconds, admit, sent

    try:
        for warm in (False, True):
            prefill(warm)
        # Interleaved rounds, medians: the GPU's prefill time drifts by ~2 ms between minutes, as much as what is
        # measured, so phases run one after the other (all alone, then all streamed) compare different clocks.
        rounds = [(prefill(False), prefill(False, only_transfer=True), prefill(True)) for _ in range(repeats)]
    finally:
        sender.close()
    alone = statistics.median(a[0] for a, _, _ in rounds)
    transfer, transfer_admit = (statistics.median(t[i] for _, t, _ in rounds) for i in (0, 1))
    streamed, streamed_admit, streamed_sent = (statistics.median(s[i] for _, _, s in rounds) for i in (0, 1, 2))
    exposed = max(statistics.median(s[0] - a[0] for a, _, s in rounds), 0.0)
    exposed_admit = max(statistics.median(s[1] - a[0] for a, _, s in rounds), 0.0)
    graphed = engine.runner.prompt_graphs is not None and engine.runner.prompt_graphs.replays > 0
    result = {
        "prompt_tokens": prompt_len,
        "prompt_graph": graphed,
        "kv_mb": blocks * runner.spec.num_layers * 2 * block * heads * dim * 2 / 1e6,
        "prefill_ms": alone * 1e3,
        "transfer_alone_ms": transfer * 1e3,
        "prefill_plus_stream_ms": streamed * 1e3,
        "prefill_with_stream_returned_ms": streamed_sent * 1e3,
        "exposed_ms": exposed * 1e3,
        "hidden_fraction": 1 - exposed / transfer,
        "transfer_alone_to_admit_ms": transfer_admit * 1e3,
        "prefill_plus_stream_to_admit_ms": streamed_admit * 1e3,
        "exposed_to_admit_ms": exposed_admit * 1e3,
        "hidden_fraction_to_admit": 1 - exposed_admit / transfer_admit,
        "rounds_ms": [[[x * 1e3 for x in run] for run in r] for r in rounds],  # (alone, transfer, streamed) each
    }
    print(
        f"\noverlap, {prompt_len}-token prompt on llama3-8b ({result['kv_mb']:.0f} MB of KV, "
        f"{'graph' if graphed else 'eager'}): prefill "
        f"{result['prefill_ms']:.1f} ms, transfer alone {result['transfer_alone_ms']:.1f} ms, prefill+stream "
        f"{result['prefill_plus_stream_ms']:.1f} ms -> {result['hidden_fraction']:.0%} of the transfer hidden"
        f"\n  until decode can admit: transfer alone {result['transfer_alone_to_admit_ms']:.1f} ms, prefill+stream "
        f"{result['prefill_plus_stream_to_admit_ms']:.1f} ms -> {result['hidden_fraction_to_admit']:.0%} hidden"
        f"\n  first token (TTFT on the prefill side): {result['prefill_ms']:.1f} ms alone, "
        f"{result['prefill_with_stream_returned_ms']:.1f} ms while streaming"
    )
    return result


def run(
    backend: str,
    sizes_mb: list[float],
    dtype: torch.dtype,
    repeats: int,
    overlap_prompts: list[int],
    overlap_eager: bool = False,
) -> dict:
    """``nccl`` (two GPUs) or ``cuda_ipc`` (one GPU), and the overlap with a prefill of each of ``overlap_prompts``
    (with ``overlap_eager``, also with prompt graphs off)."""
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise SystemExit("--nccl needs two GPUs")
    pair = Pair(backend, "cuda:1" if backend == "nccl" else SENDER)
    try:
        rows = transfer_rows(pair, sizes_mb, dtype, repeats)
        modes = (True, False) if overlap_eager else (True,)
        hidden = [overlap(pair, n, repeats, graphs) for n in overlap_prompts for graphs in modes]
    finally:
        pair.close()
    return {"device": torch.cuda.get_device_name(0), "rows": rows, "overlap": hidden}
