"""Performance profile of one model on one GPU type: the simulator's only source of timings, costs and power.

A profile is a YAML file (see ``configs/profiles/`` and ``docs/simulator.md``); ``splitserve profile``
(``profile_run``) measures one on hardware (the shipped ones were), and ``sim_validate --fit-serving`` adds what a live
cluster costs around the engine.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from splitserve.simulator.errors import SimInputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPUSpec(_Strict):
    name: str = Field(description="GPU type, e.g. h100-sxm.")
    cost_per_hour: float = Field(ge=0, description="Price of one GPU-hour, in dollars.")
    power_w: float = Field(gt=0, description="Board power while running a batch, in watts.")
    idle_power_w: float = Field(ge=0, description="Board power while idle, in watts.")


class PrefillSpec(_Strict):
    """Prefill batch time, piecewise-linear in the batch's total prompt tokens (linear extrapolation past the end)."""

    tokens: list[int] = Field(min_length=2, description="Batch sizes in tokens, strictly increasing.")
    seconds: list[float] = Field(min_length=2, description="Measured batch time at each entry of tokens.")

    @field_validator("tokens")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in itertools.pairwise(v)) or v[0] < 1:
            raise ValueError("must be positive and strictly increasing")
        return v


class DecodeSpec(_Strict):
    """Decode step time = base_s + per_seq_s * batch + per_context_token_s * (context tokens summed over the batch)."""

    base_s: float = Field(ge=0, description="Fixed cost of a step: reading the weights, launch overhead.")
    per_seq_s: float = Field(ge=0, description="Cost per sequence in the batch: compute, sampling.")
    per_context_token_s: float = Field(ge=0, description="Cost per cached token read by attention.")

    def step_time(self, batch: int, context_tokens: int) -> float:
        return self.base_s + self.per_seq_s * batch + self.per_context_token_s * context_tokens


class MixedSpec(_Strict):
    """A colocated step with both a prompt chunk and decodes: the longer of the two alone plus ``extra_s``, and
    never less than ``floor_s``.

    Such a step runs eagerly (no CUDA graph): for a short chunk its host work outlasts the device's, so it costs
    about the same whatever the chunk (on one H200, 22-30 ms for chunks of 128 and 512 tokens beside 1-32 decodes,
    against 14 ms for their prefill alone); a long chunk is device-bound and costs little more than its prefill
    (53.5-56 ms against 52-53 ms at 2048). 0 in a profile measured before ``splitserve profile`` measured them."""

    extra_s: float = Field(0.0, ge=0, description="Time added to the longer of a mixed step's prefill and decode.")
    floor_s: float = Field(0.0, ge=0, description="The least a mixed step takes: its eager pass's host work.")


class ServingSpec(_Strict):
    """What a running cluster adds around the engine's own timings (both 0 in a profile of the engine alone).

    Fitted from a live run at low load (``sim_validate --fit-serving``): the router and worker hops, admission and
    token streaming through Ray and gRPC. The per-request latencies shift a request's tokens without holding a GPU:
    modelled as engine time instead, the per-prompt-token part overshot TTFT at high load by 12-13% on an H200."""

    request_s: float = Field(0.0, ge=0, description="Latency added once per request, before its first token.")
    ingress_s: float = Field(
        0.0,
        ge=0,
        description="A request's way from its arrival into its worker's engine, before it can be scheduled; it "
        "makes no progress while that worker launches a step with prompt tokens, whose eager pass holds the "
        "worker's interpreter (fitted on a step trace: the median wait of a request that wakes an idle engine).",
    )
    step_s: float = Field(0.0, ge=0, description="Time added to every engine step: the worker loop around it.")
    prompt_step_floor_s: float = Field(
        0.0,
        ge=0,
        description="The least a served step with a prompt chunk (prefill or mixed) takes: its eager pass's host "
        "work, slower in a busy serving worker than in the profile's engine alone (fitted on a step trace).",
    )
    shared_gpu_slowdown: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The share of its speed a decode step loses while a prefill pass runs on its GPU, where pools "
        "share GPUs: it gains this many seconds per second beside one (fitted on a step trace of such a cluster).",
    )
    shared_gpu_prefill_slowdown: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The share of its device speed a prefill pass loses when it starts while the decode worker on "
        "its GPU steps, where pools share GPUs (the GPU time-slices the two processes); a host-bound pass keeps "
        "its floor (fitted on a step trace of such a cluster).",
    )
    prompt_token_s: float = Field(
        0.0,
        ge=0,
        description="Latency added once per request per prompt token, before its first token: what grows with the "
        "prompt outside the engine's profiled passes (fitted on TTFT's spread, p50 to p90; its cause not isolated).",
    )


class TransferSpec(_Strict):
    latency_s: float = Field(
        ge=0, description="Fixed cost of one request's KV transfer, after its last byte and its prefill pass's end."
    )
    bandwidth_bytes_per_s: float = Field(
        gt=0, description="Achieved bandwidth of the transfer: how long its bytes hold the links they cross."
    )


class TPScaling(_Strict):
    """What deriving a tp=N profile from a measured tp=1 profile assumes (``tp_derive``): the model's shape and the
    GPUs' link, none of which a tp=1 profile records."""

    layers: int = Field(gt=0, description="Transformer layers: each adds two all-reduces to a TP forward pass.")
    hidden_size: int = Field(gt=0, description="Hidden size: an all-reduce moves tokens x hidden_size activations.")
    kv_heads: int = Field(gt=0, description="KV heads: ranks beyond this many hold replicated heads.")
    weight_bytes: float = Field(gt=0, description="Bytes of the model's weights (each rank holds 1/tp of them).")
    activation_bytes: int = Field(2, gt=0, description="Bytes of one activation element (2: bf16/fp16).")
    prefill_efficiency: float = Field(
        gt=0, le=1, description="Share of the ideal tp-fold speed-up a compute-bound prefill pass gets."
    )
    link_latency_s: float = Field(ge=0, description="Fixed cost of one all-reduce between the ranks.")
    link_bandwidth_bytes_per_s: float = Field(gt=0, description="Bus bandwidth of an all-reduce (ring).")


class DerivedFrom(_Strict):
    """Marks a profile as derived, not measured: from which profile, by which model, with which assumptions."""

    profile: str = Field(description="The measured profile it was derived from.")
    tensor_parallel_size: int = Field(ge=1, description="That profile's tensor_parallel_size.")
    method: Literal["tp_scaling"] = Field(description="The derivation: see splitserve.simulator.tp_derive.")
    assumptions: TPScaling


class Profile(_Strict):
    model: str
    gpu: GPUSpec
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs of one worker (its tensor-parallel ranks); cost and power are per GPU."
    )
    derived_from: DerivedFrom | None = Field(
        None, description="Set on a profile derived for planning (never measured); absent on a measured one."
    )
    kv_bytes_per_token: int = Field(gt=0, description="KV cache bytes of one token, all layers.")
    kv_capacity_tokens: int = Field(
        gt=0, description="KV cache tokens one worker (all its ranks) holds after weights and activations."
    )
    prefill: PrefillSpec
    decode: DecodeSpec
    kv_transfer: dict[str, TransferSpec] = Field(min_length=1, description="One entry per KV transfer backend.")
    mixed: MixedSpec = Field(default_factory=MixedSpec, description="A colocated mixed step's own cost.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The cluster's own overheads.")

    _pt: np.ndarray = PrivateAttr()
    _ps: np.ndarray = PrivateAttr()
    _slope: float = PrivateAttr()

    @model_validator(mode="after")
    def _same_length(self) -> Profile:
        if len(self.prefill.tokens) != len(self.prefill.seconds):
            raise ValueError("prefill.tokens and prefill.seconds must have the same length")
        return self

    def model_post_init(self, _ctx: object) -> None:
        self._pt = np.asarray(self.prefill.tokens, dtype=float)
        self._ps = np.asarray(self.prefill.seconds, dtype=float)
        self._slope = float((self._ps[-1] - self._ps[-2]) / (self._pt[-1] - self._pt[-2]))

    @property
    def derived(self) -> bool:
        return self.derived_from is not None

    def prefill_time(self, tokens: float) -> float:
        """Seconds for one prefill batch of ``tokens`` prompt tokens (pure Python: it runs once per batch)."""
        t, s = self.prefill.tokens, self.prefill.seconds
        i = bisect.bisect_left(t, tokens)
        if i == 0:
            return s[0]
        if i == len(t):
            return s[-1] + self._slope * (tokens - t[-1])
        return s[i - 1] + (s[i] - s[i - 1]) * (tokens - t[i - 1]) / (t[i] - t[i - 1])

    def prefill_times(self, tokens: np.ndarray) -> np.ndarray:
        """Vectorised ``prefill_time`` (for precomputing per-request costs)."""
        t, s = self._pt, self._ps
        out = np.interp(tokens, t, s)
        over = tokens > t[-1]
        out[over] = s[-1] + self._slope * (tokens[over] - t[-1])
        return out

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return self.decode.step_time(batch, context_tokens)

    def step_time(self, prefill_tokens: int, decodes: int, context_tokens: int) -> float:
        """One continuous-batching step, the worker loop's ``serving.step_s`` included: the longer of the decode
        step (memory-bound) and the prefill of every row (compute-bound); with both, plus ``mixed.extra_s`` and at
        least ``mixed.floor_s``; with a prompt chunk, at least ``serving.prompt_step_floor_s``."""
        serving = self.serving
        decode = self.decode.step_time(decodes, context_tokens) + serving.step_s if decodes else 0.0
        if not prefill_tokens:
            return decode
        seconds = max(decode, self.prefill_time(prefill_tokens + decodes) + serving.step_s)
        if decodes:
            seconds = max(seconds + self.mixed.extra_s, self.mixed.floor_s + serving.step_s)
        return max(seconds, serving.prompt_step_floor_s)

    def transfer_time(self, tokens: int, backend: str) -> float:
        spec = self.kv_transfer[backend]
        return spec.latency_s + tokens * self.kv_bytes_per_token / spec.bandwidth_bytes_per_s


def load_profiles(paths: Sequence[str | Path]) -> list[tuple[Path, Profile]]:
    """Each path a profile YAML or a directory of them (every ``*.yaml`` in it, sorted), each with its file."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.yaml"))
            if not found:
                raise SimInputError(f"--profile {path}: a directory with no *.yaml in it (fix: pass profile YAMLs)")
            files += found
        else:
            files.append(path)
    return [(f, load_profile(f)) for f in files]


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile YAML; every problem becomes one ``SimInputError`` line."""
    p = Path(path)
    if not p.is_file():
        raise SimInputError(f"--profile: no file {p} (fix: pass a YAML from configs/profiles/)")
    try:
        data = yaml.safe_load(p.read_text())
        return Profile.model_validate(data)
    except yaml.YAMLError as err:
        raise SimInputError(
            f"--profile {p}: not valid YAML ({err.__class__.__name__}) (fix: check the syntax)"
        ) from err
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "<root>"
        raise SimInputError(f"--profile {p}: {loc}: {first['msg']} (fix: see docs/simulator.md)") from err
