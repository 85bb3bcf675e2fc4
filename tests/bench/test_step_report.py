"""Served steps against a profile's prices: grouped by kind and size, summed exactly, windowed by a run's clock."""

from __future__ import annotations

import json

import pytest

from splitserve.bench import step_report
from splitserve.bench.validate import _served_steps
from splitserve.engine import step_trace
from splitserve.engine.step_trace import StepRecord
from tests.simulator.conftest import make_profile


def _step(start: float, seconds: float, prefill: int = 0, decodes: int = 0, context: int = 0) -> StepRecord:
    return StepRecord(start, seconds, 0.0, prefill, 1 if prefill else 0, decodes, context, read_back=False)


def test_steps_group_by_kind_and_size_with_the_profiles_price():
    toy = make_profile()
    steps = [_step(0, 0.010, decodes=2, context=200), _step(1, 0.012, decodes=3, context=300)]
    steps += [_step(2, 0.050, prefill=900), _step(3, 0.080, prefill=600, decodes=10, context=5000)]
    groups = step_report.compare(steps, toy)
    assert [(g.kind, g.size, g.steps) for g in groups] == [
        ("decode", "<=4 rows", 2),
        ("prefill", "<=1024 tok", 1),
        ("mixed", "<=1024 tok", 1),
        ("all", "", 4),
    ]
    decode, prefill, mixed, every = groups
    assert decode.measured_s == pytest.approx(0.022)
    assert decode.predicted_s == pytest.approx(toy.decode_step_time(2, 200) + toy.decode_step_time(3, 300))
    assert prefill.predicted_p50_ms == pytest.approx(toy.prefill_time(900) * 1e3)
    assert mixed.predicted_s == pytest.approx(toy.step_time(600, 10, 5000))
    assert every.measured_s == pytest.approx(0.152) and every.ratio == pytest.approx(every.predicted_s / 0.152)
    assert "ratio" in step_report.format_table(groups) and json.dumps(step_report.to_json(groups))


def test_a_validation_run_gets_each_rates_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(step_trace._trace, "directory", str(tmp_path))
    for start, decodes in ((1.0, 1), (1.5, 2), (2.5, 4), (9.0, 8)):  # the last is after both runs
        step_trace._trace.write(f"{start} 0.006 0.004 0 0 {decodes} {decodes * 100} 1\n")
    rows = [{"rate": 4.0, "clock_s": [0.5, 2.0]}, {"rate": 8.0, "clock_s": [2.0, 3.0]}]
    tables = _served_steps(rows, step_trace.load(tmp_path), make_profile())
    assert [rate for rate, _ in tables] == [4.0, 8.0]
    assert [g["steps"] for g in rows[0]["steps"]] == [1, 1, 2]  # <=1 row, <=4 rows, all
    assert [g["size"] for g in rows[1]["steps"]] == ["<=4 rows", ""]


def test_without_a_trace_the_rows_are_left_alone():
    rows = [{"rate": 4.0, "clock_s": [0.0, 1.0]}]
    assert _served_steps(rows, [], make_profile()) == [] and "steps" not in rows[0]


def test_the_cli_reads_a_trace_directory(tmp_path, capsys):
    (tmp_path / f"{step_trace.PREFIX}1.log").write_text("1.0 0.02 0.01 128 1 0 0 0\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(make_profile().model_dump_json())
    assert step_report.main([str(tmp_path), "--profile", str(profile)]) == 0
    assert "prefill" in capsys.readouterr().out
    assert step_report.main([str(tmp_path / "none"), "--profile", str(profile)]) == 2
