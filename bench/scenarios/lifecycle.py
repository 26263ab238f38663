"""Scenario 4: lifecycle load, the earlier Ops-Core scenario.

500 agents (2 load generator processes, one gRPC channel per agent) each call
ReportState in a closed loop, alternating ACTIVE and IDLE, as fast as the server
answers, for a fixed time. Reported: successful reports/s, latency percentiles,
and every error (a dropped connection shows as UNAVAILABLE).
"""

from __future__ import annotations

from typing import Any

from bench.common import (
    Context,
    CpuMeter,
    LoadGen,
    latency_summary,
    loadgens,
    metric,
    opscore_server,
    remove_db,
)
from bench.dispatch_run import split

NAME = "lifecycle"
TITLE = "4. Lifecycle load: 500 agents reporting state"
AGENTS = 500
LEGACY = {"reports_per_s": 59.0, "p99_ms": 1200.0}


def run(ctx: Context) -> dict[str, Any]:
    duration = 3 if ctx.quick else 10
    rs: list[dict[str, Any]] = []
    for rep in range(ctx.repeats):
        tag = f"s4-r{rep}"
        with opscore_server(ctx.work_dir, tag=tag) as srv:
            gens = [
                LoadGen(
                    "reporters",
                    {
                        "target": srv.target,
                        "n_agents": k,
                        "id_prefix": f"{tag}-p{j}",
                        "duration_s": duration,
                    },
                    ctx.work_dir / f"{tag}-reporters{j}.log",
                )
                for j, k in enumerate(split(AGENTS, 2))
            ]
            with loadgens(gens):
                for g in gens:
                    g.wait_ready()
                meter = CpuMeter({"server": [srv.pid], "loadgen": [g.pid for g in gens]})
                meter.start()
                for g in gens:
                    g.send("GO")
                results = [g.wait_result(timeout=duration + 120) for g in gens]
                meter.stop()
        remove_db(srv.db)
        ok = sum(r["ok"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        t0 = min(r["t_start"] for r in results)
        t1 = max(r["t_end"] for r in results)
        lat = latency_summary(x for r in results for x in r["latencies_s"])
        rs.append(
            {
                "ok": ok,
                "seconds": t1 - t0,
                "reports_per_s": ok / (t1 - t0),
                "latency": lat,
                "errors": errors,
                "cpu": meter.result({"loadgen": sum(r["cpu_s"] for r in results)}),
            }
        )
        ctx.say(f"  {ok / (t1 - t0):.0f} reports/s, p99 {lat['p99_ms']:.0f} ms, errors {errors}")
    m = {"reports_per_s": metric([r["reports_per_s"] for r in rs], "reports/s")}
    for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        m[k] = metric([r["latency"][k] for r in rs], "ms", "lower")
    m["errors"] = metric([sum(r["errors"].values()) for r in rs], "calls", "lower")
    m["server_cores"] = metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower")
    m["loadgen_cores"] = metric([r["cpu"]["loadgen_cores"] for r in rs], "cores", "lower")
    cfg = {
        "name": f"{AGENTS} agents, closed loop, {duration} s",
        "params": {"agents": AGENTS, "duration_s": duration},
        "metrics": m,
        "runs": rs,
    }
    return {
        "title": TITLE,
        "status": "ok",
        "configs": [cfg],
        "ratios": [
            {
                "name": "reports/s vs the earlier service's 59 reports/s (its published figure, "
                "not re-measured here)",
                "value": m["reports_per_s"]["median"] / LEGACY["reports_per_s"],
            }
        ],
        "notes": [
            "Each ReportState is a durable write (the reply waits for the commit). "
            "The earlier service's figures (59 reports/s, p99 1.2 s, dropped "
            "connections) come from its own report, on other hardware.",
        ],
    }
