"""Both agent shapes against two variants of the server (a log level, an event
loop), alternating within every repeat so that a drift in the machine's load
does not always favour the same variant. Scenarios 10 and 11."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

SHAPES = {
    "unary": {"shape": "unary", "mode": "unary", "mif": 1},
    "stream": {"shape": "stream", "mode": "batch", "mif": 4},
}
SHAPE_NAMES = {
    "unary": "unary shape, 16 agents, EnqueueTask",
    "stream": "work stream, 16 agents, EnqueueTasks, max_in_flight 4",
}

Runs = dict[tuple[str, str], list[dict[str, Any]]]


def run_variants(
    ctx: Context,
    *,
    scenario: str,
    variants: Sequence[str],
    repeats: int,
    server_options: dict[str, dict[str, Any]],
) -> Runs:
    """`repeats` runs of each (shape, variant); `server_options[variant]` are the
    keyword arguments of opscore_server for it."""
    sizes = {"unary": 2000 if ctx.quick else 10000, "stream": 6000 if ctx.quick else 30000}
    points = [(s, v) for s in SHAPES for v in variants]
    runs: Runs = {p: [] for p in points}
    for rep in range(repeats):
        order = points if rep % 2 == 0 else list(reversed(points))
        for shape, variant in order:
            c = SHAPES[shape]
            tag = f"{scenario}-r{rep}-{shape}-{variant}"
            with opscore_server(ctx.work_dir, tag=tag, **server_options[variant]) as srv:
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=16,
                    n_tasks=sizes[shape],
                    mode=c["mode"],
                    shape=c["shape"],
                    max_in_flight=c["mif"],
                )
            remove_db(srv.db)
            r.pop("assign_latency", None)
            runs[(shape, variant)].append(r)
            ctx.say(
                f"  {SHAPE_NAMES[shape]}, {variant}: {r['tasks_per_s']:.0f} tasks/s, "
                f"{r['server_cpu_us_per_task']:.0f} µs/task"
            )
    return runs


def configs(runs: Runs, *, label: str, param: str) -> list[dict[str, Any]]:
    """The report's configurations: tasks/s, server CPU per task and cores of each
    (shape, variant), named `SHAPE_NAMES[shape], {label} {variant}`."""
    return [
        {
            "name": f"{SHAPE_NAMES[shape]}, {label} {variant}",
            "params": {"shape": shape, param: variant, **SHAPES[shape]},
            "metrics": {
                "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                "server_cpu_us_per_task": metric(
                    [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                ),
                "server_cores": metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower"),
            },
            "runs": rs,
        }
        for (shape, variant), rs in runs.items()
    ]


def median(runs: Runs, shape: str, variant: str, key: str = "tasks_per_s") -> float:
    return float(metric([r[key] for r in runs[(shape, variant)]], "")["median"])
