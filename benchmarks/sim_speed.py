"""How fast the simulator is: wall time to simulate N requests (default 1M) on one core, per serving mode.

The cluster is sized to carry the load (about 95% decode utilisation), as a planner run would, with the measured
Llama-3-8B H100 profile: 100 req/s, prompts lognormal(median 1000), outputs lognormal(median 200).

    python benchmarks/sim_speed.py [--num-requests 1000000] [--out results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.metrics import summarize
from splitserve.simulator.profile import load_profile
from splitserve.simulator.workload import LengthDist, synthetic
from splitserve.slo import SLO

PROFILE = Path(__file__).resolve().parents[1] / "configs" / "profiles" / "llama3-8b-h100.yaml"
TARGET_S_PER_MILLION = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--out", default="results/sim_speed.json")
    args = ap.parse_args()

    profile = load_profile(PROFILE)
    t0 = time.perf_counter()
    wl = synthetic(
        rate=args.rate,
        num_requests=args.num_requests,
        prompt=LengthDist("lognormal", 1000, 0.6),
        output=LengthDist("lognormal", 200, 0.6),
        seed=0,
    )
    gen_s = time.perf_counter() - t0
    clusters = {
        "disaggregated 4P+3D": ClusterSpec("disaggregated", PoolSpec(4, profile), PoolSpec(3, profile)),
        "colocated 7": ClusterSpec("colocated", PoolSpec(7, profile)),
    }
    rows = []
    for name, cluster in clusters.items():
        t0, c0 = time.perf_counter(), time.process_time()
        result = simulate(cluster, wl)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = summarize(result, SLO())
        rows.append(
            {
                "config": name,
                "requests": len(wl),
                "events": result.events,
                "wall_s": wall,
                "cpu_s": cpu,
                "requests_per_s": len(wl) / wall,
                "s_per_million": wall / len(wl) * 1e6,
                "simulated_s": m.makespan_s,
                "utilisation": m.utilisation,
                "slo_attainment": m.slo_attainment,
            }
        )

    print(f"workload generation: {gen_s:.2f} s for {len(wl)} requests")
    print(f"{'config':<22}{'requests':>10}{'events':>10}{'wall s':>9}{'req/s':>10}{'s per 1M':>10}  utilisation")
    for r in rows:
        util = ", ".join(f"{k} {v:.0%}" for k, v in r["utilisation"].items())
        print(
            f"{r['config']:<22}{r['requests']:>10}{r['events']:>10}{r['wall_s']:>9.2f}{r['requests_per_s']:>10.0f}"
            f"{r['s_per_million']:>10.1f}  {util}"
        )
    ok = all(r["s_per_million"] < TARGET_S_PER_MILLION for r in rows)
    print(f"target < {TARGET_S_PER_MILLION:.0f} s per 1M requests: {'met' if ok else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "generation_s": gen_s,
                "runs": rows,
                "target_met": ok,
            },
            indent=2,
        )
    )
    print("wrote", out)


if __name__ == "__main__":
    main()
