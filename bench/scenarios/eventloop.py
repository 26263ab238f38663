"""Scenario 11: the server on asyncio's event loop against uvloop (its default).

`opscore serve --event-loop asyncio` and `--event-loop uvloop`, alternating
within every repeat, for both agent shapes: the unary shape (16 agents, unary
EnqueueTask) and the work stream (16 agents, batched EnqueueTasks,
max_in_flight 4). tasks/s and server CPU µs per task, for the record of the
choice of uvloop.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context
from bench.variants import SHAPE_NAMES, SHAPES, configs, median, run_variants

NAME = "eventloop"
TITLE = "11. Event loop: asyncio vs uvloop"
LOOPS = ("asyncio", "uvloop")


def run(ctx: Context) -> dict[str, Any]:
    runs = run_variants(
        ctx,
        scenario="eventloop",
        variants=LOOPS,
        repeats=ctx.repeats,
        server_options={loop: {"extra": ("--event-loop", loop)} for loop in LOOPS},
    )
    cfgs = configs(runs, label="--event-loop", param="event_loop")

    def med(shape: str, loop: str, key: str) -> float:
        return median(runs, shape, loop, key)

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
