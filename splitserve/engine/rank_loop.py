"""A tensor-parallel engine run offline: N processes, rank 0 the leader, ranks 1..N-1 followers.

The leader owns the scheduler (``Engine``): each step it plans the forward passes on the host and broadcasts them
as one int64 buffer (``StepChannel``) before it runs them; a follower loops on receiving a step and running the
same passes, which joins it to the model's all-reduces and all-gathers, until the leader stops it. No Ray call and
no pickling happens per step.

Sampling happens on the leader only, from the logits the LM head's all-gather gives every rank. A follower never
needs a sampled token until it is an input of a later step, and then it comes inside that step's buffer, so random
sampling needs no generator kept in step on every rank. The price: no overlapped decode at tp > 1 (a step's input
tokens must be on the leader's host before the step is handed over).

On CUDA each rank takes the GPU of its rank's index, and the model's collectives run over nccl, so the decode and
prompt CUDA graphs capture them (every rank captures the same graphs in the same order at start-up); the step
buffer still goes over gloo, host to host.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.context import SpawnProcess
from typing import Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve.engine.engine import Engine, EngineConfig
from splitserve.engine.loader import load_hf_config
from splitserve.engine.model import LayerHook
from splitserve.engine.model_spec import spec_from_hf_config
from splitserve.engine.runner import ModelRunner, RunnerConfig, resolve_device
from splitserve.engine.tensor_parallel import RankGroup, Shard, StepChannel, TensorParallelError, init_rank_group

log = logging.getLogger(__name__)

FollowerDone = Callable[[ModelRunner], None]
"""Called in a follower's process with its runner once the leader has stopped it (tests read its state)."""

_JOIN_SECONDS = 60


class StepHooks(Protocol):
    """A follower's part of a step beyond its passes, from the step's attachment (``StepChannel.attach``)."""

    def layer_hook(self, attachment: bytes) -> LayerHook | None:
        """The hook to run after each layer of the step's passes (None: none)."""

    def step_done(self) -> None:
        """After the step's passes: what waits for them to end (e.g. a transfer's last layer)."""


def follow(runner: ModelRunner, group: RankGroup, hooks: StepHooks | None = None) -> int:
    """Run every step the leader hands over until it stops; the number of steps run."""
    steps = 0
    while (step := StepChannel.receive(group)) is not None:
        passes, attachment = step
        hook = hooks.layer_hook(attachment) if hooks is not None and attachment else None
        with torch.inference_mode():
            runner.run_passes(passes, hook)
        if hook is not None and hooks is not None:
            hooks.step_done()
        steps += 1
    return steps


def _follower(rank: int, size: int, init_method: str, config: RunnerConfig, done: FollowerDone | None) -> None:
    device = resolve_device(config.device)
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    group = init_rank_group(rank, size, init_method, device)
    try:
        runner = ModelRunner(config, rank_group=group)
        follow(runner, group)
        if done is not None:
            done(runner)
    finally:
        dist.destroy_process_group()


def _check_fits(config: RunnerConfig, size: int) -> None:
    """Fail here, before any process starts, on a model that does not split or too few GPUs."""
    if config.model_dir is not None:
        Shard(spec_from_hf_config(load_hf_config(config.model_dir)), 0, size)
    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise TensorParallelError(
            f"tensor_parallel_size: {size} ranks need {size} GPUs, this machine has {torch.cuda.device_count()} "
            "(fix: a smaller size)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def offline_engine(
    config: EngineConfig, tensor_parallel_size: int = 1, follower_done: FollowerDone | None = None
) -> Iterator[Engine]:
    """An engine over ``tensor_parallel_size`` ranks: the leader in this process, each follower a spawned process
    (stopped, and waited for, on exit). At size 1, a plain engine and no process group."""
    if tensor_parallel_size < 1:
        raise TensorParallelError(f"tensor_parallel_size: {tensor_parallel_size} (fix: 1 or more)")
    if tensor_parallel_size == 1:
        yield Engine(config)
        return
    size = tensor_parallel_size
    _check_fits(config.runner, size)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # Followers build the same runner as the leader's Engine does (its graphs sized to the scheduler's batch).
    runner_config = Engine.runner_config(config)
    context = mp.get_context("spawn")
    followers = [
        context.Process(target=_follower, args=(rank, size, init_method, runner_config, follower_done), daemon=True)
        for rank in range(1, size)
    ]
    for process in followers:
        process.start()
    engine: Engine | None = None
    try:
        group = init_rank_group(0, size, init_method, resolve_device(config.runner.device))
        engine = Engine(config, rank_group=group)
        yield engine
    except RuntimeError as err:  # a collective fails once any rank is gone: say which
        exits = _shut_down(engine, followers)
        if exits:
            raise RuntimeError(f"tensor-parallel followers exited: {_describe(exits)}") from err
        raise
    except BaseException:
        _shut_down(engine, followers)
        raise
    exits = _shut_down(engine, followers)
    if exits:
        raise RuntimeError(f"tensor-parallel followers exited with an error: {_describe(exits)} (see their stderr)")


def _shut_down(engine: Engine | None, followers: list[SpawnProcess]) -> dict[int, int | None]:
    """Stop the followers and leave the group; the ranks that exited with an error, and their exit codes."""
    if engine is not None and engine.runner.step_channel is not None:
        try:
            engine.runner.step_channel.stop()
        except RuntimeError as err:  # a rank is gone and the group with it: the others exit on their own errors
            log.warning("the tensor-parallel group could not be stopped: %s", err)
    exits = _join(followers)
    if dist.is_initialized():
        dist.destroy_process_group()
    return exits


def _describe(exits: dict[int, int | None]) -> str:
    return ", ".join(f"rank {rank} with exit code {code}" for rank, code in exits.items())


def _join(followers: list[SpawnProcess]) -> dict[int, int | None]:
    """Wait for the followers (terminating any still running after the wait); the failed ranks' exit codes."""
    exits = {}
    for rank, process in enumerate(followers, start=1):
        process.join(_JOIN_SECONDS)
        if process.is_alive():
            process.terminate()
            process.join()
        if process.exitcode != 0:
            exits[rank] = process.exitcode
    return exits
