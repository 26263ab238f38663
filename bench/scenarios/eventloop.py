"""Scenario 11: the server on asyncio's event loop against uvloop (its default).

`opscore serve --event-loop asyncio` and `--event-loop uvloop`, alternating
within every repeat, for both agent shapes: the unary shape (16 agents, unary
EnqueueTask) and the work stream (16 agents, batched EnqueueTasks,
max_in_flight 4). tasks/s and server CPU µs per task, for the record of the
choice of uvloop.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch
from bench.scenarios.logging_cost import SHAPE_NAMES, SHAPES

NAME = "eventloop"
TITLE = "11. Event loop: asyncio vs uvloop"


def run(ctx: Context) -> dict[str, Any]:
    sizes = {"unary": 2000 if ctx.quick else 10000, "stream": 6000 if ctx.quick else 30000}
    points = [(s, loop) for s in SHAPES for loop in ("asyncio", "uvloop")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {p: [] for p in points}
    for rep in range(ctx.repeats):
        order = points if rep % 2 == 0 else list(reversed(points))
        for shape, loop in order:
            c = SHAPES[shape]
            tag = f"s10-r{rep}-{shape}-{loop}"
            with opscore_server(ctx.work_dir, tag=tag, extra=("--event-loop", loop)) as srv:
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
            runs[(shape, loop)].append(r)
            ctx.say(
                f"  {SHAPE_NAMES[shape]}, {loop}: {r['tasks_per_s']:.0f} tasks/s, "
                f"{r['server_cpu_us_per_task']:.0f} µs/task"
            )
    cfgs = []
    for shape, loop in points:
        rs = runs[(shape, loop)]
        cfgs.append(
            {
                "name": f"{SHAPE_NAMES[shape]}, --event-loop {loop}",
                "params": {"shape": shape, "event_loop": loop, **SHAPES[shape]},
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                    "server_cores": metric(
                        [r["cpu"]["server_cores"] for r in rs], "cores", "lower"
                    ),
                },
                "runs": rs,
            }
        )

    def med(shape: str, loop: str, key: str) -> float:
        return metric([r[key] for r in runs[(shape, loop)]], "")["median"]

    ratios = []
    for shape in SHAPES:
        ratios.append(
            {
                "name": f"{SHAPE_NAMES[shape]}: uvloop / asyncio (tasks/s)",
                "value": med(shape, "uvloop", "tasks_per_s") / med(shape, "asyncio", "tasks_per_s"),
            }
        )
        ratios.append(
            {
                "name": f"{SHAPE_NAMES[shape]}: uvloop / asyncio (server CPU per task)",
                "value": med(shape, "uvloop", "server_cpu_us_per_task")
                / med(shape, "asyncio", "server_cpu_us_per_task"),
            }
        )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": ratios,
        "notes": ["Loops alternate within each repeat; ratios of medians of this run."],
    }
