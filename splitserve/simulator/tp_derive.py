"""A tp=N profile derived from a measured tp=1 profile: what to plan with before the tp=N engine is measured.

The model (``derived_from.method: tp_scaling``). Every figure comes from the measured profile except what
``TPScaling`` assumes (the model's shape and the link between the ranks), which the derived profile records:

* A pass's **fixed cost** ``f`` (host work, launches) does not shrink with tp. It is what the measured decode step's
  ``base_s`` leaves after reading the weights, read at the profile's own memory bandwidth
  (``per_context_token_s`` is the time to read one token's ``kv_bytes_per_token`` of KV):
  ``f = max(0, base_s - weight_bytes * per_context_token_s / kv_bytes_per_token)``.
* An **all-reduce** of ``m`` bytes over N ranks (ring) costs ``link_latency_s + 2 (N-1)/N * m /
  link_bandwidth_bytes_per_s``; a forward pass has ``2 * layers + 1`` of them (attention's and the MLP's output
  projections, the vocab-parallel embedding), each of ``tokens * hidden_size * activation_bytes`` bytes.
* **Prefill** of T tokens (compute-bound): ``f + (t(T) - f) / (N * prefill_efficiency) + all-reduces(T)``.
* **Decode** step (memory-bound): the weights and the KV are read split N ways, the KV no finer than one KV head
  per rank (heads are replicated beyond ``kv_heads`` ranks): ``base_s = f + (base_s - f) / N + (2 layers + 1) *
  link_latency_s``, ``per_seq_s = per_seq_s / N`` plus each sequence's all-reduce bytes, ``per_context_token_s =
  per_context_token_s / min(N, kv_heads)``.
* **KV capacity**: each rank frees ``(1 - 1/N)`` of the weights for KV and holds ``1 / min(N, kv_heads)`` of each
  token's KV.
* ``mixed.extra_s`` (a mixed step's second read of the weights) is divided by N; ``mixed.floor_s`` (host work),
  ``serving`` (the cluster's overheads), ``kv_transfer`` (one link's figures, though N rank pairs send in
  parallel: conservative) and ``gpu`` (per GPU) are kept as measured.
"""

from __future__ import annotations

from splitserve.simulator.errors import SimInputError
from splitserve.simulator.profile import DecodeSpec, DerivedFrom, PrefillSpec, Profile, TPScaling


def allreduce_s(scaling: TPScaling, tp: int, tokens: float) -> float:
    """One ring all-reduce of ``tokens`` rows of activations over ``tp`` ranks."""
    moved = 2 * (tp - 1) / tp * tokens * scaling.hidden_size * scaling.activation_bytes
    return scaling.link_latency_s + moved / scaling.link_bandwidth_bytes_per_s


def fixed_pass_s(profile: Profile, scaling: TPScaling) -> float:
    """The part of a pass that tp does not split: the decode step's base less its weight read."""
    weight_read = scaling.weight_bytes * profile.decode.per_context_token_s / profile.kv_bytes_per_token
    return max(0.0, profile.decode.base_s - weight_read)


def derive_tp(profile: Profile, tp: int, scaling: TPScaling, source: str) -> Profile:
    """``profile`` (measured at tp=1, read from ``source``) as the tp=``tp`` worker the module's model predicts."""
    if profile.derived_from is not None or profile.tensor_parallel_size != 1:
        raise SimInputError(
            f"PROFILE {source}: derive from a measured tensor_parallel_size 1 profile, not a "
            f"{'derived' if profile.derived_from else f'tp={profile.tensor_parallel_size}'} one "
            "(fix: pass the measured tp=1 profile)"
        )
    if tp < 2:
        raise SimInputError(f"--tp: must be >= 2 to derive, got {tp} (fix: the measured profile is tp=1)")
    passes = 2 * scaling.layers + 1
    fixed = fixed_pass_s(profile, scaling)
    speedup = tp * scaling.prefill_efficiency
    prefill = [
        fixed + (seconds - fixed) / speedup + passes * allreduce_s(scaling, tp, tokens)
        for tokens, seconds in zip(profile.prefill.tokens, profile.prefill.seconds, strict=True)
    ]
    dec = profile.decode
    per_seq_allreduce = passes * (allreduce_s(scaling, tp, 1) - scaling.link_latency_s)
    heads = min(tp, scaling.kv_heads)
    kv_bytes = profile.kv_bytes_per_token
    capacity = (profile.kv_capacity_tokens * kv_bytes + scaling.weight_bytes * (1 - 1 / tp)) * heads / kv_bytes
    return profile.model_copy(
        update={
            "tensor_parallel_size": tp,
            "derived_from": DerivedFrom(
                profile=source, tensor_parallel_size=1, method="tp_scaling", assumptions=scaling
            ),
            "kv_capacity_tokens": int(capacity),
            "prefill": PrefillSpec(tokens=list(profile.prefill.tokens), seconds=prefill),
            "decode": DecodeSpec(
                base_s=fixed + (dec.base_s - fixed) / tp + passes * scaling.link_latency_s,
                per_seq_s=dec.per_seq_s / tp + per_seq_allreduce,
                per_context_token_s=dec.per_context_token_s / heads,
            ),
            "mixed": profile.mixed.model_copy(update={"extra_s": profile.mixed.extra_s / tp}),
        }
    )


def header(profile: Profile, command: str) -> list[str]:
    """The derived file's comment: that it is derived, how, from what, and what it assumed."""
    src = profile.derived_from
    assert src is not None
    a = src.assumptions
    return [
        f"DERIVED for planning, NOT MEASURED: tensor_parallel_size {profile.tensor_parallel_size} predicted from the "
        f"measured tp=1 profile",
        f"  {src.profile} by the tp_scaling model (splitserve/simulator/tp_derive.py).",
        f"  Assumed, not measured: an all-reduce costs {a.link_latency_s:g} s + bytes / "
        f"{a.link_bandwidth_bytes_per_s:g} B/s; prefill gets {a.prefill_efficiency:g} of the ideal speed-up.",
        "  Measure with `splitserve profile --tp N` once the engine runs tensor-parallel, and plan with that instead.",
        f"  {command}",
    ]
