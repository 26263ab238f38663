"""Scenario 1: end-to-end throughput, both agent shapes.

N tasks are enqueued while agents are subscribed; every task is assigned and
completed. Time runs from the enqueuer's first call to the last completion
acknowledged (the CompleteTask reply, or the AgentMessageResult on the work
stream).

- Unary shape (SubscribeTasks + a CompleteTask call per task), as measured
  before issue 10: 1, 16 and 256 agents, unary EnqueueTask (64 calls in flight)
  and batched EnqueueTasks (1,000 tasks per call).
- Work-stream shape (Connect; every assignment completed on the stream, the
  completions of one received message sent as one message): 16 and 256 agents,
  batched EnqueueTasks, max_in_flight 1 (as the unary runs) and 4.

All at log level WARNING (the cost of INFO is scenario 10). Configurations are
interleaved within each repeat, so machine noise hits them alike. The issue's
checks are made on medians of this run; the unary figures are also shown next
to the previous published run's (a different run: not a ratio).
"""

from __future__ import annotations

from typing import Any

from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "throughput"
TITLE = "1. End-to-end throughput"

# Issue 10's targets for the work stream (16 agents, batched enqueue).
TARGET_TASKS_PER_S = 3000
TARGET_CPU_US = 300
# The unary figures of the previous published full run (docs/benchmarks.md at
# commit 21d3fdb, 2026-11-24): another run, so shown beside ours, never divided.
PREVIOUS_UNARY = {
    (1, "unary"): 509,
    (1, "batch"): 666,
    (16, "unary"): 749,
    (16, "batch"): 1137,
    (256, "unary"): 760,
    (256, "batch"): 1160,
}


def configs(quick: bool) -> list[dict[str, Any]]:
    n_unary = 2000 if quick else 10000
    # The work stream is several times faster: more tasks for a measured window
    # of several seconds.
    n_stream = 6000 if quick else 30000
    out = []
    for a in [1, 16] if quick else [1, 16, 256]:
        for mode in ("unary", "batch"):
            out.append({"shape": "unary", "agents": a, "mode": mode, "mif": 1, "n_tasks": n_unary})
    # What the SDK sends by default: a fresh idempotency key with every enqueue.
    out.append(
        {"shape": "unary", "agents": 16, "mode": "unary-keyed", "mif": 1, "n_tasks": n_unary}
    )
    for a in (16, 256):
        for mif in (1, 4):
            out.append(
                {"shape": "stream", "agents": a, "mode": "batch", "mif": mif, "n_tasks": n_stream}
            )
    for c in out:
        c["log_level"] = "WARNING"
    return out


_ENQUEUE = {
    "unary": "EnqueueTask (unary)",
    "unary-keyed": "EnqueueTask (unary) with an idempotency key each",
    "batch": "EnqueueTasks (batch of 1,000)",
}


def label(c: dict[str, Any]) -> str:
    enq = _ENQUEUE[c["mode"]]
    agents = "1 agent" if c["agents"] == 1 else f"{c['agents']} agents"
    if c["shape"] == "stream":
        return f"work stream, {agents}, max_in_flight {c['mif']}, {enq}"
    return f"unary shape, {agents}, {enq}"


def summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
        "server_cores": metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower"),
        "loadgen_cores": metric([r["cpu"]["loadgen_cores"] for r in rs], "cores", "lower"),
        "server_cpu_us_per_task": metric([r["server_cpu_us_per_task"] for r in rs], "µs", "lower"),
        "loadgen_cpu_us_per_task": metric(
            [r["loadgen_cpu_us_per_task"] for r in rs], "µs", "lower"
        ),
        "complete_p50_ms": metric([r["complete_rpc_p50_ms"] for r in rs], "ms", "lower"),
    }


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
                    mode=c["mode"].removesuffix("-keyed"),
                    keyed=c["mode"].endswith("-keyed"),
                    shape=c["shape"],
                    max_in_flight=c["mif"],
                )
            remove_db(srv.db)
            r.pop("assign_latency", None)
            runs[i].append(r)
            ctx.say(
                f"  {label(c)}: {r['tasks_per_s']:.0f} tasks/s, "
                f"server {r['server_cpu_us_per_task']:.0f} µs CPU/task"
            )
    out_cfgs = [
        {"name": label(c), "params": c, "metrics": summarize(rs), "runs": rs}
        for c, rs in zip(cfgs, runs, strict=True)
    ]

    def med(shape: str, agents: int, mode: str, mif: int = 1, key: str = "tasks_per_s") -> Any:
        for oc in out_cfgs:
            p = oc["params"]
            if (p["shape"], p["agents"], p["mode"], p["mif"]) == (shape, agents, mode, mif):
                return oc["metrics"][key]["median"]
        return None

    ratios = []
    for a in (1, 16, 256):
        b, u = med("unary", a, "batch"), med("unary", a, "unary")
        if b and u:
            ratios.append(
                {
                    "name": f"unary shape, {a} agents: batch / unary enqueue (tasks/s)",
                    "value": b / u,
                }
            )
    keyed, unkeyed = med("unary", 16, "unary-keyed"), med("unary", 16, "unary")
    if keyed and unkeyed:
        ratios.append(
            {
                "name": "unary shape, 16 agents: enqueue with / without an idempotency key "
                "(tasks/s)",
                "value": keyed / unkeyed,
            }
        )
    targets = []
    for mif in (1, 4):
        s16, s256 = med("stream", 16, "batch", mif), med("stream", 256, "batch", mif)
        cpu16 = med("stream", 16, "batch", mif, "server_cpu_us_per_task")
        ub = med("unary", 16, "batch")
        if s16 and ub:
            ratios.append(
                {
                    "name": f"16 agents, batched enqueue: work stream (max_in_flight {mif}) "
                    "/ unary shape (tasks/s)",
                    "value": s16 / ub,
                }
            )
        if s16:
            targets.append(
                {
                    "target": f"≥ {TARGET_TASKS_PER_S:,} tasks/s, 16 agents, batched enqueue, "
                    f"work stream (max_in_flight {mif})",
                    "measured": f"{s16:,.0f} tasks/s",
                    "met": s16 >= TARGET_TASKS_PER_S,
                }
            )
            targets.append(
                {
                    "target": f"server CPU ≤ {TARGET_CPU_US} µs per task (aim), 16 agents, "
                    f"work stream (max_in_flight {mif})",
                    "measured": f"{cpu16:,.0f} µs",
                    "met": cpu16 <= TARGET_CPU_US,
                }
            )
        if s16 and s256:
            ratios.append(
                {
                    "name": f"work stream (max_in_flight {mif}): 256 / 16 agents (tasks/s)",
                    "value": s256 / s16,
                }
            )
            targets.append(
                {
                    "target": f"256 agents no lower than 16 (work stream, max_in_flight {mif})",
                    "measured": f"{s256:,.0f} vs {s16:,.0f} tasks/s",
                    "met": s256 >= s16,
                }
            )
    previous = []
    for (a, mode), before in PREVIOUS_UNARY.items():
        now_ = med("unary", a, mode)
        if now_:
            enq = "EnqueueTask" if mode == "unary" else "EnqueueTasks"
            previous.append(f"{a} agent(s), {enq}: {now_:,.0f} tasks/s now, {before:,} before")
    return {
        "title": TITLE,
        "status": "ok",
        "configs": out_cfgs,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            "Unary shape: SubscribeTasks + one CompleteTask call per assignment. Work stream: "
            "one Connect stream per agent; the completions of the assignments in one "
            "received message go back as one message; a task counts as completed when its "
            "AgentMessageResult says accepted.",
            "Agents: 1 agent runs in 1 process; more agents are split over 2 processes; every "
            "agent has its own gRPC channel (its own TCP connection) and completes each "
            "assignment at once (no-op task).",
            "Enqueuer: 1 process; unary = EnqueueTask with 64 calls in flight; batch = "
            "EnqueueTasks with 1,000 tasks per call, 64 calls in flight.",
            "CPU: psutil user+system seconds of the server process and of all load "
            "generator processes during the measured window, divided by its wall time.",
            "The unary shape must not get slower than before issue 10. The previous figures "
            "are from another run (docs/benchmarks.md, commit 21d3fdb, 2026-11-24, same "
            "machine), so they are quoted beside this run's, not divided: "
            + "; ".join(previous)
            + ".",
        ],
    }
