"""Scenario 2: enqueue -> assignment latency at fixed offered rates.

16 agents are subscribed and idle. An open-loop enqueuer starts one unary
EnqueueTask per 1/rate seconds whether or not earlier calls have returned (so a
slow server cannot slow the offered load down: no coordinated omission). Each
task's input carries t0, the monotonic clock read just before its EnqueueTask call;
the agent that receives the assignment subtracts it from its own reading of the
same system-wide clock. Percentiles are over every task of a run; each figure is
the median over repeats of that run's percentile.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "latency"
TITLE = "2. Enqueue → assignment latency at fixed offered rates"
AGENTS = 16


def run(ctx: Context) -> dict[str, Any]:
    rates = [100, 500, 1000]
    duration = 3 if ctx.quick else 10
    runs: dict[int, list[dict[str, Any]]] = {r: [] for r in rates}
    for rep in range(ctx.repeats):
        for rate in rates:
            tag = f"s2-r{rep}-{rate}"
            with opscore_server(ctx.work_dir, tag=tag) as srv:
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=AGENTS,
                    n_tasks=rate * duration,
                    mode="unary",
                    rate=rate,
                    timeout_s=duration * 3 + 20,
                    # An offered rate above what the server sustains is a result
                    # (saturation), not a failure: the run ends at its time bound
                    # and reports how many tasks were assigned by then.
                    allow_incomplete=True,
                )
            remove_db(srv.db)
            runs[rate].append(r)
            lat = r["assign_latency"]
            ctx.say(
                f"  {rate}/s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
                f"max {lat['max_ms']:.1f} ms"
            )
    cfgs = []
    for rate in rates:
        rs = runs[rate]
        m = {
            k: metric([r["assign_latency"][k] for r in rs], "ms", "lower")
            for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
        m["achieved_tasks_per_s"] = metric([r["tasks_per_s"] for r in rs], "tasks/s")
        m["completed_fraction"] = metric([r["completed_fraction"] for r in rs], "of N")
        m["server_cores"] = metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower")
        m["enqueue_call_p99_ms"] = metric([r["enqueue_call_p99_ms"] for r in rs], "ms", "lower")
        m["enqueuer_max_behind_ms"] = metric(
            [r["enqueuer_max_behind_s"] * 1000 for r in rs], "ms", "lower"
        )
        cfgs.append(
            {
                "name": f"{rate} tasks/s offered, {AGENTS} idle agents, {duration} s",
                "params": {"rate": rate, "agents": AGENTS, "duration_s": duration},
                "metrics": m,
                "runs": [{k: v for k, v in r.items()} for r in rs],
            }
        )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": [],
        "notes": [
            f"{AGENTS} agents in 2 processes, one channel each, max_in_flight=1; "
            "1 open-loop enqueuer process (unary EnqueueTask).",
            "When completed_fraction is below 1 the server did not keep up with the "
            "offered rate within the run's time bound (duration x 3 + 20 s); the "
            "percentiles then cover only the tasks that were assigned, so they are a "
            "lower bound, and the calls still outstanding at the bound are cancelled.",
            "enqueuer_max_behind_ms: how late the enqueuer started its most delayed "
            "call; near 0 means the offered rate really was offered.",
        ],
    }
