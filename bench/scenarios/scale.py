"""Scenario 5: scale.

(a) History: scenario 1's 16-agent unary run on a database that already holds
10k and 1M finished tasks (quick: 10k and 100k). The prefilled file is built once
per run (bench/prefill.py: the server creates the schema, rows are inserted with
sqlite3) and copied fresh for every repeat, so every repeat starts from the same
file. Per-task cost is server CPU µs per task and wall time per task.

(b) Many agents: 1,000 and 10,000 agents (also in quick mode: issue 10's
check) each holding one stream open, SubscribeTasks or a Connect work stream.
Every process registers its agents first; then all open their streams at once,
timed until the server lists every one as open (ListAgents: open_subscriptions
> 0). Server RSS (psutil) right after start and with all open. At most 1,000
agents per process; 10 agents per gRPC channel (TCP connection) at 10,000.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from bench import prefill
from bench.common import (
    Context,
    LoadGen,
    loadgens,
    median,
    metric,
    opscore_server,
    remove_db,
    rss_bytes,
)
from bench.dispatch_run import run_dispatch, split

NAME = "scale"
BIG = 10_000
# Issue 10: 10,000 agents holding open work streams.
TARGET_CONNECT_S = 30.0
TARGET_RSS_MIB = 1024
SHAPE_NAMES = {"unary": "SubscribeTasks stream", "stream": "Connect work stream"}
TITLE = "5. Scale: history and open subscriptions"


def run(ctx: Context) -> dict[str, Any]:
    sizes = [10_000, 100_000] if ctx.quick else [10_000, 1_000_000]
    n_tasks = 2000 if ctx.quick else 10000
    sub_points = [(shape, n) for shape in ("unary", "stream") for n in (1000, BIG)]
    notes = []

    # Template databases, one per history size.
    templates = {}
    for size in sizes:
        with opscore_server(ctx.work_dir, tag=f"s5-template-{size}") as srv:
            pass
        secs = prefill.fill(srv.db, size)
        templates[size] = srv.db
        notes.append(f"prefill of {size:,} finished tasks took {secs:.1f} s")
        ctx.say(f"  prefilled {size:,} rows in {secs:.1f} s")

    hist: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
    for rep in range(ctx.repeats):
        for size in sizes:
            tag = f"s5-r{rep}-{size}"
            db = ctx.work_dir / f"{tag}.db"
            shutil.copyfile(templates[size], db)
            with opscore_server(ctx.work_dir, db=db, tag=tag) as srv:
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=16,
                    n_tasks=n_tasks,
                    mode="unary",
                )
            r["server_start_s"] = srv.start_seconds
            r.pop("assign_latency", None)
            remove_db(db)
            hist[size].append(r)
            ctx.say(
                f"  {size:,} finished rows: {r['tasks_per_s']:.0f} tasks/s, "
                f"server {r['server_cpu_us_per_task']:.0f} µs CPU/task, "
                f"start {srv.start_seconds:.2f} s"
            )
    for db in templates.values():
        remove_db(db)

    cfgs = []
    for size in sizes:
        rs = hist[size]
        cfgs.append(
            {
                "name": f"{size:,} finished tasks in the database, 16 agents, unary",
                "params": {"history_rows": size, "agents": 16, "n_tasks": n_tasks},
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "wall_us_per_task": metric([1e6 / r["tasks_per_s"] for r in rs], "µs", "lower"),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                    "server_start_s": metric([r["server_start_s"] for r in rs], "s", "lower"),
                },
                "runs": rs,
            }
        )
    small, big = cfgs[0]["metrics"], cfgs[-1]["metrics"]
    ratios = [
        {
            "name": f"per-task wall time, {sizes[-1]:,} / {sizes[0]:,} rows (1.0 = no growth)",
            "value": big["wall_us_per_task"]["median"] / small["wall_us_per_task"]["median"],
        },
        {
            "name": f"server CPU per task, {sizes[-1]:,} / {sizes[0]:,} rows (1.0 = no growth)",
            "value": big["server_cpu_us_per_task"]["median"]
            / small["server_cpu_us_per_task"]["median"],
        },
    ]

    mem: dict[tuple[str, int], list[dict[str, Any]]] = {p: [] for p in sub_points}
    for rep in range(ctx.repeats):
        for shape, n in sub_points:
            tag = f"s5m-r{rep}-{shape}-{n}"
            r = hold_open(ctx, tag, shape, n)
            mem[(shape, n)].append(r)
            ctx.say(
                f"  {n:,} agents, {SHAPE_NAMES[shape]}: RSS {r['rss_start_mib']:.0f} -> "
                f"{r['rss_open_mib']:.0f} MiB, {r['verified_open']:,} verified open, "
                f"opened in {r['open_s']:.1f} s (registration {r['register_s']:.1f} s)"
            )
    targets = []
    for shape, n in sub_points:
        rs = mem[(shape, n)]
        cfgs.append(
            {
                "name": f"{n:,} agents holding open {SHAPE_NAMES[shape]}s",
                "params": {"agents": n, "shape": shape},
                "metrics": {
                    "rss_start_mib": metric([r["rss_start_mib"] for r in rs], "MiB", "lower"),
                    "rss_open_mib": metric([r["rss_open_mib"] for r in rs], "MiB", "lower"),
                    "kib_per_agent": metric([r["kib_per_agent"] for r in rs], "KiB", "lower"),
                    "register_s": metric([r["register_s"] for r in rs], "s", "lower"),
                    "connect_all_s": metric([r["open_s"] for r in rs], "s", "lower"),
                    "verified_open": metric([r["verified_open"] for r in rs], "streams"),
                    "stream_errors": metric([r["stream_errors"] for r in rs], "streams", "lower"),
                },
                "runs": rs,
            }
        )
        opened = [r["verified_open"] for r in rs]
        if min(opened) < n:
            notes.append(
                f"{n:,} agents, {SHAPE_NAMES[shape]}: only {min(opened):,} to {max(opened):,} "
                "were verified open when RSS was taken; kib_per_agent divides the growth by "
                "the streams verified open."
            )
        if shape == "stream" and n == BIG:
            worst_open = max(r["open_s"] for r in rs)
            worst_rss = max(r["rss_open_mib"] for r in rs)
            targets += [
                {
                    "target": f"{BIG:,} agents with open work streams: every one verified open "
                    "on the server",
                    "measured": f"{min(opened):,} to {max(opened):,} of {n:,}",
                    "met": min(opened) == n,
                },
                {
                    "target": f"connecting all {BIG:,} ≤ {TARGET_CONNECT_S:g} s",
                    "measured": f"{median([r['open_s'] for r in rs]):.1f} s median, "
                    f"{worst_open:.1f} s worst",
                    "met": worst_open <= TARGET_CONNECT_S,
                },
                {
                    "target": f"server RSS with all {BIG:,} open ≤ {TARGET_RSS_MIB:,} MiB",
                    "measured": f"{median([r['rss_open_mib'] for r in rs]):.0f} MiB median, "
                    f"{worst_rss:.0f} MiB worst",
                    "met": worst_rss <= TARGET_RSS_MIB,
                },
            ]
    notes.append(
        "RSS is resident memory of the server process only (psutil memory_info().rss): "
        "right after it reports SERVING, and 1 s after the last stream is verified open."
    )
    notes.append(
        "Holders: at most 1,000 agents per process (a grpc.aio client process with ~1,500 "
        "channels or more stalls, measured), 1 channel per agent up to 1,000 agents, 10 agents "
        "per channel (one TCP connection each) beyond. Every process registers its agents, "
        "then all open their streams at once on GO: connect_all_s runs from GO until the "
        "server lists every agent of every process with an open subscription (ListAgents, "
        "open_subscriptions > 0), so registration (register_s) is not in it."
    )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": ratios,
        "targets": targets,
        "notes": notes,
    }


def hold_open(ctx: Context, tag: str, shape: str, n: int) -> dict[str, Any]:
    """`n` agents register, then all open their streams at once; the server's RSS."""
    with opscore_server(ctx.work_dir, tag=tag) as srv:
        time.sleep(0.5)
        rss0 = rss_bytes(srv.pid)
        procs = max(2, -(-n // 1000))
        per_channel = 1 if n <= 1000 else 10
        gens = [
            LoadGen(
                "agents",
                {
                    "target": srv.target,
                    "n_agents": k,
                    "id_prefix": f"{tag}-p{j}",
                    "capability": "bench",
                    "shape": shape,
                    "agents_per_channel": per_channel,
                    "deadline_s": 600,
                    "return_latencies": False,
                    "two_phase": True,
                    # A shortfall is a result (reported), not a crash of the run.
                    "allow_partial": True,
                    "verify_timeout_s": 120,
                },
                ctx.work_dir / f"{tag}-holders{j}.log",
            )
            for j, k in enumerate(split(n, procs))
        ]
        with loadgens(gens):
            t0 = time.monotonic()
            for g in gens:
                g.wait_ready(timeout=600, word="REGISTERED")
            register_s = time.monotonic() - t0
            t1 = time.monotonic()
            for g in gens:
                g.send("GO")
            for g in gens:
                g.wait_ready(timeout=600)
            open_s = time.monotonic() - t1
            time.sleep(1.0)
            rss1 = rss_bytes(srv.pid)
            for g in gens:
                g.send("STOP")
            res = [g.wait_result(timeout=120) for g in gens]
    remove_db(srv.db)
    verified = sum(r["verified_open"] for r in res)
    return {
        "rss_start_mib": rss0 / 2**20,
        "rss_open_mib": rss1 / 2**20,
        "kib_per_agent": (rss1 - rss0) / max(1, verified) / 1024,
        "verified_open": verified,
        "stream_errors": sum(sum(r["stream_ends"].values()) for r in res),
        "stream_ends": [r["stream_ends"] for r in res],
        "register_s": register_s,
        "open_s": open_s,
        "processes": procs,
        "agents_per_channel": per_channel,
    }
