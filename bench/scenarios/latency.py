"""Scenario 2: enqueue -> assignment latency at fixed offered rates.

16 agents are subscribed and idle, in either shape: SubscribeTasks + CompleteTask
(unary shape, 100/500/1,000 tasks/s as before issue 10) or the Connect work
stream (100/500/1,000/1,500 tasks/s), max_in_flight 1. An open-loop enqueuer
starts one unary
EnqueueTask per 1/rate seconds whether or not earlier calls have returned (so a
slow server cannot slow the offered load down: no coordinated omission). Each
task's input carries t0, the monotonic clock read just before its EnqueueTask call;
the agent that receives the assignment subtracts it from its own reading of the
same system-wide clock. Percentiles are over every task of a run; each figure is
the median over repeats of that run's percentile.

Each work-stream point is followed by the bare grpc.aio baseline
(bench/baselines/bare_grpc.py: the same protos and load generators, no storage,
no logic) under the same offered load, so the report can say how much of a
latency figure is this machine's gRPC and scheduling rather than Ops-Core.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context, bare_server, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

DASH = "\u2013"
NAME = "latency"
TITLE = "2. Enqueue → assignment latency at fixed offered rates"
AGENTS = 16


# Issue 10, work stream: p99 at 500 tasks/s offered, and 1,500 not saturated.
TARGET_P99_MS = 2.0
TARGET_RATE = 500
UNSATURATED_RATE = 1500
# Saturated: the server did not keep up (not every task assigned in the time
# bound, or fewer assigned per second than offered), or a backlog built up.
MIN_ACHIEVED = 0.95
BACKLOG_P99_MS = 50.0

POINTS = [("unary", r) for r in (100, 500, 1000)] + [("stream", r) for r in (100, 500, 1000, 1500)]
# The bare baseline runs each work-stream point after Ops-Core's.
BARE_SHAPE = "stream"


def saturated(r: dict[str, Any], rate: int) -> bool:
    return (
        r["completed_fraction"] < 1
        or r["tasks_per_s"] < MIN_ACHIEVED * rate
        or r["assign_latency"]["p99_ms"] > BACKLOG_P99_MS
    )


def summary(rs: list[dict[str, Any]], name: str, params: dict[str, Any]) -> dict[str, Any]:
    m = {
        k: metric([r["assign_latency"][k] for r in rs], "ms", "lower")
        for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    }
    m["achieved_tasks_per_s"] = metric([r["tasks_per_s"] for r in rs], "tasks/s")
    m["completed_fraction"] = metric([r["completed_fraction"] for r in rs], "of N")
    m["server_cores"] = metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower")
    # The assignment can go out no sooner than the enqueue is committed: the
    # EnqueueTask call's own latency is the floor under the figures above.
    m["enqueue_call_p50_ms"] = metric([r["enqueue_call_p50_ms"] for r in rs], "ms", "lower")
    m["enqueue_call_p99_ms"] = metric([r["enqueue_call_p99_ms"] for r in rs], "ms", "lower")
    m["enqueuer_max_behind_ms"] = metric(
        [r["enqueuer_max_behind_s"] * 1000 for r in rs], "ms", "lower"
    )
    m["saturated_runs"] = metric([float(r["saturated"]) for r in rs], "of repeats", "lower")
    return {"name": name, "params": params, "metrics": m, "runs": list(rs)}


def run(ctx: Context) -> dict[str, Any]:
    duration = 3 if ctx.quick else 10

    def measure(srv: Any, tag: str, shape: str, rate: int, who: str = "") -> dict[str, Any]:
        r = run_dispatch(
            target=srv.target,
            server_pid=srv.pid,
            work_dir=ctx.work_dir,
            tag=tag,
            n_agents=AGENTS,
            n_tasks=rate * duration,
            mode="unary",
            shape=shape,
            rate=rate,
            timeout_s=duration * 3 + 20,
            # An offered rate above what the server sustains is a result
            # (saturation), not a failure: the run ends at its time bound
            # and reports how many tasks were assigned by then.
            allow_incomplete=True,
        )
        r["saturated"] = saturated(r, rate)
        lat = r["assign_latency"]
        ctx.say(
            f"  {who}{shape} {rate}/s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
            f"max {lat['max_ms']:.1f} ms"
        )
        return r

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {p: [] for p in POINTS}
    bare: dict[int, list[dict[str, Any]]] = {r: [] for s, r in POINTS if s == BARE_SHAPE}
    for rep in range(ctx.repeats):
        for shape, rate in POINTS:
            tag = f"s2-r{rep}-{shape}-{rate}"
            with opscore_server(ctx.work_dir, tag=tag) as srv:
                runs[(shape, rate)].append(measure(srv, tag, shape, rate))
            remove_db(srv.db)
            if rate in bare and shape == BARE_SHAPE:
                with bare_server(ctx.work_dir, f"{tag}-bare") as srv:
                    bare[rate].append(measure(srv, f"{tag}-bare", shape, rate, "bare grpc.aio "))
    cfgs = []
    for shape, rate in POINTS:
        what = "work stream" if shape == "stream" else "unary shape"
        params = {"shape": shape, "rate": rate, "agents": AGENTS, "duration_s": duration}
        cfgs.append(
            summary(
                runs[(shape, rate)],
                f"{what}, {rate} tasks/s offered, {AGENTS} idle agents, {duration} s",
                {**params, "server": "opscore"},
            )
        )
        if shape == BARE_SHAPE and bare.get(rate):
            cfgs.append(
                summary(
                    bare[rate],
                    f"bare grpc.aio (no storage, no logic), {what}, {rate} tasks/s offered, "
                    f"{AGENTS} idle agents, {duration} s",
                    {**params, "server": "bare"},
                )
            )

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return metric([r["assign_latency"][key] for r in rs], "ms")["median"]

    ratios = [
        {
            "name": f"work stream, {rate} tasks/s offered: p99 Ops-Core / bare grpc.aio",
            "value": med(runs[(BARE_SHAPE, rate)], "p99_ms") / med(bare[rate], "p99_ms"),
        }
        for rate in bare
        if bare[rate] and runs[(BARE_SHAPE, rate)] and med(bare[rate], "p99_ms") > 0
    ]
    targets = []
    rs = runs.get(("stream", TARGET_RATE))
    if rs:
        p99 = metric([r["assign_latency"]["p99_ms"] for r in rs], "ms")
        measured = f"{p99['median']:.2f} ms [{p99['min']:.2f}{DASH}{p99['max']:.2f}]"
        if bare.get(TARGET_RATE):
            b = metric([r["assign_latency"]["p99_ms"] for r in bare[TARGET_RATE]], "ms")
            measured += (
                f"; bare grpc.aio under the same load: {b['median']:.2f} ms "
                f"[{b['min']:.2f}{DASH}{b['max']:.2f}]"
            )
        targets.append(
            {
                "target": f"work stream: enqueue → assignment p99 ≤ {TARGET_P99_MS:g} ms at "
                f"{TARGET_RATE} tasks/s offered",
                "measured": measured,
                "met": p99["median"] <= TARGET_P99_MS,
            }
        )
    rs = runs.get(("stream", UNSATURATED_RATE))
    if rs:
        sat = sum(1 for r in rs if r["saturated"])
        got = metric([r["tasks_per_s"] for r in rs], "tasks/s")
        p99 = metric([r["assign_latency"]["p99_ms"] for r in rs], "ms")
        measured = (
            f"{got['median']:,.0f} tasks/s achieved, p99 {p99['median']:.2f} ms; "
            f"saturated in {sat} of {len(rs)} repeats"
        )
        if bare.get(UNSATURATED_RATE):
            bs = bare[UNSATURATED_RATE]
            bgot = metric([r["tasks_per_s"] for r in bs], "tasks/s")
            bsat = sum(1 for r in bs if r["saturated"])
            measured += (
                f"; bare grpc.aio: {bgot['median']:,.0f} tasks/s, p99 {med(bs, 'p99_ms'):.2f} ms, "
                f"saturated in {bsat} of {len(bs)}"
            )
        targets.append(
            {
                "target": f"work stream: not saturated at {UNSATURATED_RATE:,} tasks/s offered",
                "measured": measured,
                "met": sat == 0,
            }
        )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            f"{AGENTS} agents in 2 processes, one channel each, max_in_flight=1, in the unary "
            "shape or the work stream; 1 open-loop enqueuer process (unary EnqueueTask).",
            f"saturated_runs: the share of repeats in which the server did not keep up: not "
            f"every task assigned within the time bound, fewer than {MIN_ACHIEVED:.0%} of the "
            f"offered rate achieved, or a p99 above {BACKLOG_P99_MS:g} ms (a backlog).",
            "When completed_fraction is below 1 the server did not keep up with the "
            "offered rate within the run's time bound (duration x 3 + 20 s); the "
            "percentiles then cover only the tasks that were assigned, so they are a "
            "lower bound, and the calls still outstanding at the bound are cancelled.",
            "enqueuer_max_behind_ms: how late the enqueuer started its most delayed "
            "call; near 0 means the offered rate really was offered.",
            "The bare grpc.aio rows run right after Ops-Core's at the same rate, with the "
            "same agents and enqueuer: the same messages answered from memory, on uvloop. "
            "What they show is the floor this machine's gRPC, event loop and scheduling "
            "put under any Python gRPC server; the targets stay absolute.",
        ],
    }
