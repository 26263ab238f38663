"""Scenario 9b: the soak's load on a database that already holds its history.

The same load as scenario 9 (200 agents, unary shape, 200 EnqueueTask calls per
second, durable defaults) for 8 minutes (quick: 1.5), against a fresh server
whose database was prefilled (bench/prefill.py, tasks and their attempt rows)
with as many finished tasks as scenario 9 leaves behind: 360,000 (quick:
24,000). If the p99 of its first windows is as high as the soak's last, the
drift follows the size of the database; if it is as low as the soak's first,
the database's size is not the cause (compare with scenario 9 of the same run).
"""

from __future__ import annotations

from typing import Any

from bench import prefill
from bench.common import Context, opscore_server, remove_db
from bench.scenarios.soak import AGENTS, RATE, history_rows, plan, soak_once

NAME = "soak_history"
TITLE = "9b. Soak load on a database holding the soak's history"


def run(ctx: Context) -> dict[str, Any]:
    p = plan(ctx.quick)
    window, check, seconds = p["window_s"], p["check_windows"], p["control_s"]
    history = history_rows(ctx.quick)
    db = ctx.work_dir / "s8b-prefilled.db"
    with opscore_server(ctx.work_dir, tag="s8b-template", db=db):
        pass
    secs = prefill.fill(db, history)
    ctx.say(f"  prefilled {history:,} finished tasks in {secs:.0f} s")
    try:
        r = soak_once(ctx, "s8b", seconds, window, check, 0, db=db)
    finally:
        remove_db(db)
    name = (
        f"{AGENTS} agents, {RATE} tasks/s offered, {seconds // 60} min, unary shape, "
        f"database prefilled with {history:,} finished tasks"
    )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": [
            {
                "name": name,
                "params": {"agents": AGENTS, "rate": RATE, "history": history, **p},
                "metrics": r["metrics"],
                "runs": [{k: r[k] for k in ("objects", "completed")}],
            }
        ],
        "ratios": [
            {"name": "p99, last / first windows", "value": r["last"] / r["first"]},
        ],
        "window_tables": [{"title": name, "windows": r["rows"]}],
        "notes": [
            f"Prefill of {history:,} finished tasks took {secs:.0f} s (not measured load).",
            "Compare the first windows' p99 with scenario 9's first and last windows.",
        ],
    }
