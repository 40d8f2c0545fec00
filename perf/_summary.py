"""Medians over interleaved rounds, and pyswtask/peer ratios, for perf/run.py and the bench
scripts that compare against a peer in the same run.

A round is a list of result dicts ``{"workload", "system", "value", "unit", "n", ...}``. The
row that stands for pyswtask in a workload has ``"ours": True``; every row of another system
in that workload (not a pyswtask variant) is compared with it.
"""

from __future__ import annotations

import statistics
from typing import Any

# Extras summarized as medians over the rounds (latency percentiles and the like) ...
MEDIAN_KEYS = ("p50_us", "p99_us", "mean_us", "p50_ms", "p99_ms", "max_ms", "elapsed_s",
               "send_s", "batch_p50_us", "batch_p99_us", "batch_mean_us", "cpu_us_per_req",
               "worker_cpu_us_per_req", "task_worker_cpu_us_per_req")
# ... and counts added up over the rounds (cron runs).
SUM_KEYS = ("records", "expected", "missed", "duplicated")


def higher_is_better(unit: str) -> bool:
    """Throughput units (tasks/s, ops/s) are better higher; latencies (us, ms) lower."""
    return unit.endswith("/s")


def _ratio(ours: float, peer: float, unit: str) -> float | None:
    if not ours or not peer:
        return None
    return ours / peer if higher_is_better(unit) else peer / ours


def medians(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (workload, system), in the order first seen: the median value of the
    rounds as ``median`` (and ``value``), with ``runs``, ``min``, ``max`` and ``values``."""
    order = dict.fromkeys((r["workload"], r["system"]) for rnd in rounds for r in rnd)
    out = []
    for key in order:
        samples = [r for rnd in rounds for r in rnd
                   if (r["workload"], r["system"]) == key and r.get("value") is not None]
        if not samples:
            continue
        values = [r["value"] for r in samples]
        med = round(statistics.median(values), 3)
        row = dict(samples[0])
        row.pop("value", None)
        row = {"workload": key[0], "system": key[1], "runs": len(values), "median": med,
               "min": round(min(values), 3), "max": round(max(values), 3),
               "unit": samples[0]["unit"], "values": [round(v, 3) for v in values],
               **{k: v for k, v in row.items() if k not in ("workload", "system", "unit")}}
        for k in MEDIAN_KEYS:
            got = [r[k] for r in samples if isinstance(r.get(k), (int, float))]
            if got:
                row[k] = round(statistics.median(got), 3)
        for k in SUM_KEYS:
            got = [r[k] for r in samples if isinstance(r.get(k), (int, float))]
            if got:
                row[k] = sum(got)
        row["value"] = med
        out.append(row)
    return out


def ratios(rounds: list[list[dict[str, Any]]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pyswtask against each peer of the same workload: ``value`` is the median of the ratios
    taken within each round (so drift between rounds cancels), ``of_medians`` the ratio of the
    two medians. > 1 favours pyswtask."""
    out = []
    ours_rows = {r["workload"]: r for r in rows if r.get("ours")}
    for peer in rows:
        ours = ours_rows.get(peer["workload"])
        if ours is None or peer is ours or peer["system"].startswith("pyswtask"):
            continue
        per_round = []
        for rnd in rounds:
            a = next((r for r in rnd if r["workload"] == ours["workload"]
                      and r["system"] == ours["system"] and r.get("value")), None)
            b = next((r for r in rnd if r["workload"] == peer["workload"]
                      and r["system"] == peer["system"] and r.get("value")), None)
            if a is not None and b is not None:
                per_round.append(_ratio(a["value"], b["value"], peer["unit"]))
        per_round = [x for x in per_round if x is not None]
        if not per_round:
            continue
        of_medians = _ratio(ours["median"], peer["median"], peer["unit"])
        out.append({"ratio": f"{ours['system']} vs {peer['system']}", "workload": peer["workload"],
                    "ours": ours["system"], "peer": peer["system"],
                    "value": round(statistics.median(per_round), 3),
                    "of_medians": None if of_medians is None else round(of_medians, 3),
                    "rounds": len(per_round), "unit": peer["unit"],
                    "meaning": "> 1 favours pyswtask"})
    return out
