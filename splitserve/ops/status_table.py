"""``splitserve status``: the ClusterStatus answer as a table a person reads at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from splitserve.roles import Role

ROLES = tuple(Role)
WORKER_COLUMNS = (
    "WORKER",
    "ROLE",
    "HEALTHY",
    "RESTARTS",
    "DEVICE",
    "TP",
    "GPUS",
    "QUEUED",
    "ACTIVE",
    "BATCH",
    "KV USED",
    "PREFIX HIT",
    "ROUTED",
)


def _n(value: Any) -> int:
    """protobuf's JSON form writes 64-bit integers as strings."""
    return int(value or 0)


def _kv(used: int, total: int) -> str:
    return f"{used}/{total} ({100 * used / total:.0f}%)" if total else "-"


def _prefix_hits(worker: dict[str, Any]) -> str:
    """Share of the prompt blocks looked up that the prefix cache held, since the worker started."""
    lookups = _n(worker.get("prefix_cache_lookup_blocks"))
    return f"{100 * _n(worker.get('prefix_cache_hit_blocks')) / lookups:.0f}%" if lookups else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)]


def _ranks(worker: dict[str, Any]) -> int:
    """A tensor-parallel worker's ranks (protobuf's JSON form leaves out a zero, which an old server sends)."""
    return _n(worker.get("tensor_parallel_size")) or 1


def _gpus(workers: Sequence[dict[str, Any]]) -> str:
    return f"{sum(float(w.get('gpus') or 0) for w in workers):g}"


def _health(worker: dict[str, Any]) -> str:
    if worker.get("draining"):
        return "draining"
    return "yes" if worker.get("healthy") else "NO"


def format_status(status: dict[str, Any]) -> str:
    """``status`` is ClusterStatusResponse as a dict (proto field names), as the SDK's cluster_status returns."""
    workers = status.get("workers", [])
    routed = {load["worker_id"]: _n(float(load.get("requests", 0))) for load in status.get("router_loads", [])}
    used = _n(status.get("kv_blocks_total")) - _n(status.get("kv_blocks_free"))
    lines = [
        f"splitserve: model {status.get('model')}, {status.get('mode')}, "
        + ("DRAINING (new requests get UNAVAILABLE)" if status.get("draining") else "serving"),
        f"requests: {_n(status.get('inflight'))} in flight, {float(status.get('requests_per_s', 0)):.2f} req/s, "
        f"{float(status.get('tokens_per_s', 0)):.1f} tokens/s (last {float(status.get('rate_window_s', 0)):.0f} s)",
        f"KV blocks: {_kv(used, _n(status.get('kv_blocks_total')))}",
        "",
    ]
    pool_rows = []
    for role in ROLES:
        members = [w for w in workers if w.get("role") == role]
        if not members:
            continue
        pool_used = sum(_n(w.get("kv_blocks_total")) - _n(w.get("kv_blocks_free")) for w in members)
        pool_rows.append(
            [
                role,
                str(len(members)),
                str(sum(bool(w.get("healthy")) and not w.get("draining") for w in members)),
                _gpus(members),
                str(sum(_n(w.get("queued_requests")) for w in members)),
                str(sum(_n(w.get("pending_prefill_tokens")) for w in members)),
                str(sum(_n(w.get("batch_size")) for w in members)),
                _kv(pool_used, sum(_n(w.get("kv_blocks_total")) for w in members)),
            ]
        )
    pool_columns = ("POOL", "WORKERS", "SERVING", "GPUS", "QUEUED", "PENDING TOKENS", "BATCH", "KV USED")
    lines += _table(pool_columns, pool_rows)
    lines.append("")
    worker_rows = [
        [
            w["worker_id"],
            w.get("role", ""),
            _health(w),
            str(_n(w.get("restarts"))),
            w.get("device") or "-",
            str(_ranks(w)),
            _gpus([w]),
            str(_n(w.get("queued_requests"))),
            str(_n(w.get("active_requests"))),
            str(_n(w.get("batch_size"))),
            _kv(_n(w.get("kv_blocks_total")) - _n(w.get("kv_blocks_free")), _n(w.get("kv_blocks_total"))),
            _prefix_hits(w),
            str(routed.get(w["worker_id"], 0)),
        ]
        for w in sorted(workers, key=lambda w: (ROLES.index(w.get("role", "decode")), w["worker_id"]))
    ]
    lines += _table(WORKER_COLUMNS, worker_rows)
    return "\n".join(lines)
