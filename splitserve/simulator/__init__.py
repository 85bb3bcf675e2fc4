"""Capacity-planning simulator: replays splitserve's prefill/decode scheduling on a measured (or estimated) profile."""

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import RunResult, simulate
from splitserve.simulator.metrics import Metrics, summarize
from splitserve.simulator.planner import Plan, plan, sweep_load
from splitserve.simulator.profile import Profile, TPScaling, load_profile, load_profiles
from splitserve.simulator.tp_derive import derive_tp
from splitserve.simulator.workload import LengthDist, Workload, load_trace, synthetic
from splitserve.slo import SLO

__all__ = [
    "SLO",
    "ClusterSpec",
    "LengthDist",
    "Metrics",
    "Plan",
    "PoolSpec",
    "Profile",
    "RunResult",
    "TPScaling",
    "Workload",
    "derive_tp",
    "load_profile",
    "load_profiles",
    "load_trace",
    "plan",
    "simulate",
    "summarize",
    "sweep_load",
    "synthetic",
]
