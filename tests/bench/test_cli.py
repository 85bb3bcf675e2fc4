"""``splitserve bench`` parses through register(), and bad workload flags are one-line errors, not tracebacks."""

from __future__ import annotations

import argparse

import pytest

from splitserve.bench.cli import parse_rates, register
from splitserve.simulator.errors import SimInputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_bench_subcommand_parses_a_sweep():
    args = _parser().parse_args(["bench", "--address", "h:1", "--rates", "1,2.5", "--prompt-len", "uniform:8:64"])
    assert (args.address, args.rates, args.num_requests, args.out_dir) == ("h:1", "1,2.5", 64, "results/serve")
    assert parse_rates(args.rates) == [1.0, 2.5]


@pytest.mark.parametrize(
    "argv",
    [
        ["--rates", "fast"],
        ["--rates", "1,-2"],
        ["--rates", "1", "--prompt-len", "lognormal:0:1"],
        ["--prompt-len", "8"],  # no rates and no trace: nothing says when to send
    ],
)
def test_bad_workload_flags_exit_2_before_any_connection(argv, capsys):
    args = _parser().parse_args(["bench", "--address", "127.0.0.1:1", *argv])
    assert args.func(args) == 2
    assert "splitserve bench: --" in capsys.readouterr().err


def test_no_rates_means_one_run_at_the_trace_timing():
    assert parse_rates(None) == [None]
    with pytest.raises(SimInputError):
        parse_rates(",")
