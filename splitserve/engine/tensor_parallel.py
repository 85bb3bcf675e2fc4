"""Megatron-style tensor parallelism: which slice of each weight a rank holds, and the rank group's collectives.

Rank ``r`` of ``tp`` holds query heads ``[r*H/tp, (r+1)*H/tp)``, the KV heads those queries read, intermediate
columns ``[r*I/tp, (r+1)*I/tp)`` and vocabulary rows ``[r*Vr, (r+1)*Vr)`` with ``Vr = ceil(V/tp)`` (the last rank's
rows past V are zeros). Where ``kv_heads >= tp`` the KV heads split evenly; where ``kv_heads < tp``, each KV head is
held by ``tp / kv_heads`` consecutive ranks, so each rank holds one KV head and its cache holds only that head.

Per layer, the column-parallel q/k/v and gate/up need no communication, and the row-parallel ``o_proj`` and
``down_proj`` end in one all-reduce each; the embedding is a masked lookup and an all-reduce, the LM head an
all-gather of each rank's logit columns. At ``tp = 1`` no model holds a group and none of this runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.engine.model_spec import ModelSpec
from splitserve.engine.step_plan import Pass, pack, unpack

CONTROL_TIMEOUT = timedelta(days=30)


class TensorParallelError(ValueError):
    """A model shape that does not split over the requested ranks; the message names the field and the fix."""


def rank_kv_heads(num_kv_heads: int, size: int, rank: int) -> range:
    """The KV heads rank ``rank`` of ``size`` holds: an even part where there are at least ``size``, else the one head
    its query heads read (each head then held by ``size / num_kv_heads`` consecutive ranks)."""
    if num_kv_heads >= size:
        per = num_kv_heads // size
        return range(rank * per, (rank + 1) * per)
    head = rank // (size // num_kv_heads)
    return range(head, head + 1)


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size``'s slice of a model of shape ``spec``."""

    spec: ModelSpec
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        s, tp = self.spec, self.size
        fix = "(fix: a --tensor-parallel-size that divides it)"
        if s.num_heads % tp:
            raise TensorParallelError(f"num_attention_heads {s.num_heads} does not split over {tp} ranks {fix}")
        if s.intermediate_size % tp:
            raise TensorParallelError(f"intermediate_size {s.intermediate_size} does not split over {tp} ranks {fix}")
        if s.num_kv_heads % tp and tp % s.num_kv_heads:
            raise TensorParallelError(
                f"num_key_value_heads {s.num_kv_heads} neither splits over {tp} ranks nor divides it {fix}"
            )

    def _even_part(self, total: int) -> range:
        per = total // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def heads(self) -> range:
        return self._even_part(self.spec.num_heads)

    @property
    def kv_heads(self) -> range:
        return rank_kv_heads(self.spec.num_kv_heads, self.size, self.rank)

    @property
    def intermediate(self) -> range:
        return self._even_part(self.spec.intermediate_size)

    @property
    def vocab_rows(self) -> int:
        """Rows of this rank's embedding and LM head (the same on every rank, so the logit shards gather)."""
        return -(-self.spec.vocab_size // self.size)

    @property
    def vocab(self) -> range:
        """The token ids this rank's rows hold (the last rank's may be fewer than ``vocab_rows``)."""
        start = self.rank * self.vocab_rows
        return range(start, min(start + self.vocab_rows, self.spec.vocab_size))

    def local_spec(self) -> ModelSpec:
        """The shape of this rank's attention and MLP: its heads, its KV heads, its intermediate columns."""
        return replace(
            self.spec,
            num_heads=len(self.heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=len(self.intermediate),
        )


@dataclass
class RankGroup:
    """This process's place in a tensor-parallel group. ``device_group`` carries the model's collectives (nccl on
    CUDA, gloo on CPU); ``control_group`` (gloo) carries each step's inputs from the leader, rank 0."""

    rank: int
    size: int
    device_group: dist.ProcessGroup
    control_group: dist.ProcessGroup

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.device_group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] on each rank -> [T, size * C], rank 0's columns first."""
        rows, cols = x.shape
        out = torch.empty((self.size * rows, cols), dtype=x.dtype, device=x.device)
        dist.all_gather_single(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, -1)


# WorkerStats.extra key -> help text: a tensor-parallel leader's share of its steps' host time spent handing them over.
HANDOFF_COUNTERS: dict[str, str] = {
    "tp_step_handoff_seconds_total": "Time a tensor-parallel worker's leader spent handing its steps to the other "
    "ranks (part of the engine's host time per step).",
}


class StepChannel:
    """The leader's side of the step hand-off: each step's passes as one int64 buffer broadcast over the gloo
    control group (a second broadcast only for a step longer than the first buffer), and the step's attachment, if
    any, as a byte buffer after it. Followers read both with ``receive``; a negative length tells them to stop.

    The attachment carries what the followers' part of the step needs beyond its passes: a prefill worker's transfer
    orders for the prompts that complete in it (prefill_worker/rank_sends.py), which the followers' layer hooks
    need before the pass's first layer ends."""

    HEAD = 1024  # ints in the first broadcast: a decode step of a few dozen sequences fits
    _FIELDS = 2  # the head's own: the passes' length, the attachment's

    def __init__(self, group: RankGroup):
        self.group = group
        self.steps_sent = 0
        self.send_seconds = 0.0  # the leader's host time in ``send``: the step's cost of tensor parallelism
        self._attachment = b""

    def attach(self, payload: bytes) -> None:
        """Bytes the next step carries to the followers (one step's worth: the next ``send`` takes them)."""
        self._attachment = payload

    def send(self, passes: list[Pass]) -> None:
        began = time.perf_counter()
        flat = pack(passes)
        payload, self._attachment = self._attachment, b""
        room = self.HEAD - self._FIELDS
        self._broadcast_head(len(flat), len(payload), flat[:room])
        if len(flat) > room:
            dist.broadcast(torch.tensor(flat[room:], dtype=torch.long), 0, group=self.group.control_group)
        if payload:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            dist.broadcast(data, 0, group=self.group.control_group)
        self.steps_sent += 1
        self.send_seconds += time.perf_counter() - began

    def as_extra(self) -> dict[str, float]:
        return {"tp_step_handoff_seconds_total": self.send_seconds}

    def stop(self) -> None:
        self._broadcast_head(-1, 0, [])

    def _broadcast_head(self, length: int, attached: int, first: list[int]) -> None:
        head = torch.zeros(self.HEAD, dtype=torch.long)
        head[: len(first) + self._FIELDS] = torch.tensor([length, attached, *first], dtype=torch.long)
        dist.broadcast(head, 0, group=self.group.control_group)

    @classmethod
    def receive(cls, group: RankGroup) -> tuple[list[Pass], bytes] | None:
        """A follower's next step from the leader, and its attachment (empty if none); None once the leader
        stops."""
        head = torch.empty(cls.HEAD, dtype=torch.long)
        dist.broadcast(head, 0, group=group.control_group)
        length, attached = int(head[0]), int(head[1])
        if length < 0:
            return None
        room = cls.HEAD - cls._FIELDS
        flat = head[cls._FIELDS : min(length, room) + cls._FIELDS].tolist()
        if length > room:
            rest = torch.empty(length - room, dtype=torch.long)
            dist.broadcast(rest, 0, group=group.control_group)
            flat += rest.tolist()
        payload = b""
        if attached:
            data = torch.empty(attached, dtype=torch.uint8)
            dist.broadcast(data, 0, group=group.control_group)
            payload = data.numpy().tobytes()
        return unpack(flat), payload


def init_rank_group(
    rank: int, size: int, init_method: str, device: torch.device, cuda_index: int | None = None
) -> RankGroup:
    """Join the group of ``size`` processes rendezvousing at ``init_method`` (e.g. ``tcp://127.0.0.1:PORT``).

    ``cuda_index``: the rank's GPU among those this process sees; by default its rank (every rank sees every GPU,
    as spawned processes do; a Ray actor sees only its own, index 0)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank if cuda_index is None else cuda_index)  # one GPU per rank
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    world = dist.group.WORLD
    assert world is not None
    # A group of its own with no practical timeout: a follower waits in it for as long as the leader has no step to
    # run (an idle server). A rank that dies still fails it at once (the connection closes).
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return RankGroup(rank, size, world, control)
