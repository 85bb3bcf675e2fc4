"""Multi-turn benchmark: conversations from the Azure conversation trace, replayed under each router policy.

    python benchmarks/multiturn.py --config configs/tiny-cpu.yaml \
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --conversations 8 \
        --turns 4 --think exponential:2 --policies jsq,round_robin

For each policy it starts the cluster of CONFIG in this process (its mode, that router policy, free ports), replays
the same conversations (same messages, answer lengths and think times; see splitserve/bench/multiturn.py for how
they come from the trace) through the gRPC SDK, and stops it. Prints one table per turn index and policy and writes
the JSON (per-turn summaries and every turn's record) under --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from splitserve.bench import cli, multiturn_report
from splitserve.bench.local_cluster import local_cluster
from splitserve.bench.multiturn import Conversation, MultiTurnSpec, build_conversations
from splitserve.bench.multiturn_load import max_context, replay_at
from splitserve.config import ConfigError, RouterConfig, RouterPolicy, SplitserveConfig, load_config
from splitserve.simulator.errors import SimInputError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="cluster YAML; its router.policy is replaced by each of --policies")
    p.add_argument("--policies", default="jsq,round_robin", help="comma-separated router policies to compare")
    p.add_argument("--trace", help="the Azure conversation trace CSV the lengths are drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one turn may take before it counts failed")
    p.add_argument("--out-dir", default=cli.DEFAULT_OUT_DIR, help="where the JSON goes")
    cli.add_multiturn_args(p)
    return p.parse_args(argv)


def parse_policies(text: str) -> list[RouterPolicy]:
    """Each as the config's router.policy reads it (an old name is an error naming the new one)."""
    policies = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        try:
            policies.append(RouterConfig.model_validate({"policy": name}).policy)
        except ValidationError as err:
            raise SimInputError(f"--policies: {name!r}: {err.errors()[0]['msg']}") from None
    if not policies:
        raise SimInputError("--policies: empty (fix: e.g. --policies jsq,round_robin)")
    return policies


def with_policy(config: SplitserveConfig, policy: RouterPolicy) -> SplitserveConfig:
    return config.model_copy(update={"router": config.router.model_copy(update={"policy": policy})})


async def compare_policies(
    config: SplitserveConfig, policies: list[RouterPolicy], spec: MultiTurnSpec, timeout_s: float
) -> tuple[list[multiturn_report.PolicyRun], int]:
    """One policy at a time, each on a fresh cluster (empty prefix caches), all on the same conversations."""
    runs = []
    conversations: list[Conversation] = []
    context = 0
    for policy in policies:
        async with local_cluster(with_policy(config, policy), config.mode) as address:
            if not conversations:
                context = await max_context(address)
                conversations = build_conversations(spec, context)
            turns = sum(len(c.turns) for c in conversations)
            print(
                f"{policy.value}: serving on {address}; {len(conversations)} conversations, {turns} turns", flush=True
            )
            replay = await replay_at(address, conversations, timeout_s)
            runs.append(multiturn_report.PolicyRun(policy.value, replay.duration_s, replay.records))
    return runs, context


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        policies = parse_policies(args.policies)
        spec = cli.multiturn_spec(args)
    except (ConfigError, SimInputError) as err:
        print(err, file=sys.stderr)
        return 2
    runs, context = asyncio.run(compare_policies(config, policies, spec, args.timeout))
    meta = cli.run_meta(
        args,
        config=args.config,
        mode=config.mode.value,
        device=cli.device_name(config.cluster.device.value),
        model=config.model.path,
        workload=cli.multiturn_meta(spec, context),
    )
    path = Path(args.out_dir) / "multiturn.json"
    multiturn_report.write_json(path, meta, runs)
    print(multiturn_report.format_table(runs))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
