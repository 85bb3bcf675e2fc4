from __future__ import annotations

import numpy as np
import pytest

from splitserve.simulator.errors import SimInputError
from splitserve.simulator.workload import LengthDist, load_trace, synthetic

AZURE_ROWS = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:45.0000000,0,7
"""


def test_azure_trace_with_datetimes_is_sorted_and_relative(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(AZURE_ROWS)
    wl = load_trace(path)
    np.testing.assert_allclose(wl.arrival_s, [0.0, 1.68059, 5.995169])
    assert wl.prompt_tokens.tolist() == [1, 374, 396]  # zero-token prompt clamped to 1
    assert wl.output_tokens.tolist() == [7, 44, 109]


def test_trace_with_seconds_and_limit(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,100,5\n11.0,200,6\n12.0,300,7\n")
    wl = load_trace(path, limit=2)
    assert wl.arrival_s.tolist() == [0.0, 0.5]
    assert wl.prompt_tokens.tolist() == [100, 200]


def test_trace_missing_column_names_it(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,PromptTokens,GeneratedTokens\n1,2,3\n")
    with pytest.raises(SimInputError, match="missing column ContextTokens"):
        load_trace(path)


def test_trace_missing_file():
    with pytest.raises(SimInputError, match="--trace"):
        load_trace("/nonexistent/trace.csv")


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_synthetic_arrivals_have_the_asked_rate_and_burstiness(arrival, cv):
    wl = synthetic(
        rate=50,
        num_requests=40_000,
        prompt=LengthDist("fixed", 10),
        output=LengthDist("fixed", 5),
        arrival=arrival,
        cv=cv,
        seed=3,
    )
    gaps = np.diff(wl.arrival_s)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert set(LengthDist.parse("128", "--prompt-len").sample(rng, 10)) == {128}
    u = LengthDist.parse("uniform:10:20", "--prompt-len").sample(rng, 5000)
    assert u.min() == 10 and u.max() == 20
    ln = LengthDist.parse("lognormal:500:0.8", "--prompt-len").sample(rng, 20000)
    assert np.median(ln) == pytest.approx(500, rel=0.05) and ln.min() >= 1


@pytest.mark.parametrize("text", ["abc", "uniform:5", "uniform:9:3", "normal:1:2", "0"])
def test_bad_length_spec_names_the_flag(text):
    with pytest.raises(SimInputError, match="--output-len"):
        LengthDist.parse(text, "--output-len")


def test_non_positive_rate_is_rejected():
    with pytest.raises(SimInputError, match="--rate"):
        synthetic(rate=0, num_requests=10, prompt=LengthDist("fixed", 1), output=LengthDist("fixed", 1))


def test_at_rate_stretches_time_only():
    wl = synthetic(rate=10, num_requests=1000, prompt=LengthDist("fixed", 3), output=LengthDist("fixed", 4), seed=1)
    fast = wl.at_rate(40)
    assert fast.rate == pytest.approx(40)
    ratio = fast.arrival_s[1:] / wl.arrival_s[1:]
    np.testing.assert_allclose(ratio, ratio[0])  # one stretch factor: burst shape kept
    assert fast.prompt_tokens is wl.prompt_tokens and fast.output_tokens is wl.output_tokens
