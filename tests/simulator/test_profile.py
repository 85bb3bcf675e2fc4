from __future__ import annotations

import numpy as np
import pytest

from splitserve.simulator.errors import SimInputError
from splitserve.simulator.profile import MixedSpec, ServingSpec, load_profile
from tests.simulator.conftest import PROFILES


def test_shipped_profiles_are_consistent(h100, h200):
    """One model shape on two GPUs: the same KV per token; time grows with tokens, batch and context on both."""
    assert h100.kv_bytes_per_token == h200.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
    for profile in (h100, h200):
        assert profile.prefill.seconds == sorted(profile.prefill.seconds)
        assert profile.prefill_time(8192) > profile.prefill_time(64)
        assert profile.decode_step_time(64, 64_000) > profile.decode_step_time(1, 512) > 0
        assert "nccl" in profile.kv_transfer


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_says_whether_it_is_measured_or_derived(path):
    header = path.read_text().split("\nmodel:")[0]
    if load_profile(path).derived:
        assert header.startswith("# DERIVED for planning, NOT MEASURED")
    else:
        assert header.startswith("# Measured by `splitserve profile` on ") and "PROVISIONAL" not in header


def test_prefill_interpolates_between_points_and_extrapolates_past_the_last(h100):
    t, s = h100.prefill.tokens, h100.prefill.seconds
    mid = (t[3] + t[4]) / 2
    assert h100.prefill_time(mid) == pytest.approx((s[3] + s[4]) / 2)
    slope = (s[-1] - s[-2]) / (t[-1] - t[-2])
    assert h100.prefill_time(t[-1] + 1000) == pytest.approx(s[-1] + 1000 * slope)
    xs = np.array([1.0, mid, t[-1] + 1000.0])
    np.testing.assert_allclose(h100.prefill_times(xs), [h100.prefill_time(x) for x in xs])


def test_transfer_time_is_latency_plus_bytes_over_bandwidth(toy):
    assert toy.transfer_time(1000, "nccl") == pytest.approx(0.001 + 1000 * 1000 / 1e9)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("model: x\n", "gpu"),
        ("{}", "model"),
    ],
)
def test_bad_profile_names_the_field(tmp_path, text, field):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(SimInputError, match=field):
        load_profile(path)


def test_unsorted_prefill_points_are_rejected(tmp_path, h100):
    data = h100.model_dump()
    data["prefill"]["tokens"] = list(reversed(data["prefill"]["tokens"]))
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SimInputError, match=r"prefill\.tokens"):
        load_profile(path)


def test_a_steps_price_follows_its_shape(toy):
    mixed = toy.model_copy(update={"mixed": MixedSpec(extra_s=0.002), "serving": ServingSpec(step_s=0.001)})
    decode = toy.decode_step_time(8, 4000)
    assert mixed.step_time(0, 8, 4000) == pytest.approx(decode + 0.001)
    assert mixed.step_time(500, 0, 0) == pytest.approx(toy.prefill_time(500) + 0.001)  # no decodes: no mixed extra
    # Both: the longer of the two (here the prefill of every row), plus the extra.
    assert mixed.step_time(500, 8, 4000) == pytest.approx(toy.prefill_time(508) + 0.001 + 0.002)
    assert mixed.step_time(1, 8, 4000) == pytest.approx(max(decode, toy.prefill_time(9)) + 0.001 + 0.002)


def test_a_step_with_a_prompt_chunk_costs_at_least_its_floors(toy):
    floors = toy.model_copy(
        update={"mixed": MixedSpec(extra_s=0.002, floor_s=0.03), "serving": ServingSpec(prompt_step_floor_s=0.04)}
    )
    mixed_only = toy.model_copy(update={"mixed": MixedSpec(extra_s=0.002, floor_s=0.03)})
    assert mixed_only.step_time(100, 8, 4000) == pytest.approx(0.03)  # short chunk: host-bound, the floor
    assert mixed_only.step_time(5000, 8, 4000) == pytest.approx(toy.prefill_time(5008) + 0.002)  # device-bound
    assert mixed_only.step_time(100, 0, 0) == pytest.approx(toy.prefill_time(100))  # no decodes: no mixed floor
    assert floors.step_time(100, 0, 0) == pytest.approx(0.04)  # the served floor holds for any prompt chunk
    assert floors.step_time(0, 8, 4000) == pytest.approx(toy.decode_step_time(8, 4000))  # but not for decodes
