"""Scenario 1: end-to-end throughput.

N tasks are enqueued while agents are subscribed; every task is assigned and
completed. Time runs from the enqueuer's first call to the last CompleteTask
reply. Two enqueue variants, reported separately: unary EnqueueTask (64 calls in
flight) and batched EnqueueTasks (1,000 tasks per call). Plus one configuration
with the server at its default INFO log level (one JSON line per RPC), so the
cost of per-RPC logging is visible. Configurations are interleaved within each
repeat, so machine noise hits them alike.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "throughput"
TITLE = "1. End-to-end throughput"


def configs(quick: bool) -> list[dict[str, Any]]:
    agents = [1, 16] if quick else [1, 16, 256]
    n = 2000 if quick else 10000
    out = []
    for a in agents:
        for mode in ("unary", "batch"):
            out.append({"agents": a, "mode": mode, "n_tasks": n, "log_level": "WARNING"})
    out.append({"agents": 16, "mode": "unary", "n_tasks": n, "log_level": "INFO"})
    return out


def label(c: dict[str, Any]) -> str:
    enq = "EnqueueTask (unary)" if c["mode"] == "unary" else "EnqueueTasks (batch of 1,000)"
    agents = "1 agent" if c["agents"] == 1 else f"{c['agents']} agents"
    return f"{agents}, {enq}, log {c['log_level']}"


def run(ctx: Context) -> dict[str, Any]:
    cfgs = configs(ctx.quick)
    runs: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    for rep in range(ctx.repeats):
        for i, c in enumerate(cfgs):
            tag = f"s1-r{rep}-c{i}"
            with opscore_server(ctx.work_dir, log_level=c["log_level"], tag=tag) as srv:
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=c["agents"],
                    n_tasks=c["n_tasks"],
                    mode=c["mode"],
                )
            remove_db(srv.db)
            r.pop("assign_latency", None)
            runs[i].append(r)
            ctx.say(f"  {label(c)}: {r['tasks_per_s']:.0f} tasks/s")
    out_cfgs = []
    for c, rs in zip(cfgs, runs, strict=True):
        out_cfgs.append(
            {
                "name": label(c),
                "params": c,
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "server_cores": metric(
                        [r["cpu"]["server_cores"] for r in rs], "cores", "lower"
                    ),
                    "loadgen_cores": metric(
                        [r["cpu"]["loadgen_cores"] for r in rs], "cores", "lower"
                    ),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                    "loadgen_cpu_us_per_task": metric(
                        [r["loadgen_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                },
                "runs": rs,
            }
        )

    def med(agents: int, mode: str, level: str = "WARNING") -> float | None:
        for oc in out_cfgs:
            p = oc["params"]
            if (p["agents"], p["mode"], p["log_level"]) == (agents, mode, level):
                return oc["metrics"]["tasks_per_s"]["median"]
        return None

    ratios = []
    info, warn = med(16, "unary", "INFO"), med(16, "unary")
    if info and warn:
        ratios.append(
            {"name": "16 agents unary: log INFO / log WARNING (tasks/s)", "value": info / warn}
        )
    for a in (1, 16, 256):
        b, u = med(a, "batch"), med(a, "unary")
        if b and u:
            ratios.append({"name": f"{a} agents: batch / unary enqueue (tasks/s)", "value": b / u})
    return {
        "title": TITLE,
        "status": "ok",
        "configs": out_cfgs,
        "ratios": ratios,
        "notes": [
            "Agents: 1 agent runs in 1 process; more agents are split over 2 processes; "
            "every agent has its own gRPC channel (its own TCP connection), "
            "max_in_flight=1, and completes each assignment at once (no-op task).",
            "Enqueuer: 1 process; unary = EnqueueTask with 64 calls in flight; "
            "batch = EnqueueTasks with 1,000 tasks per call, 64 calls in flight.",
            "CPU: psutil user+system seconds of the server process and of all load "
            "generator processes during the measured window, divided by its wall time.",
        ],
    }
