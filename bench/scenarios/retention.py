"""Scenario 8: retention (issue 14). Two questions, each answered with a ratio of
two servers measured in this same run that differ only in `--retention`:

(a) File size at steady load: 16 agents, an open-loop enqueuer at a fixed rate
(200 tasks/s) for T seconds (120; quick 30), every task completed at once.
One server prunes with a short retention R (20 s; quick 5 s), the other keeps
everything (`--retention off`). The orchestrator samples the file sizes
(database + write-ahead log, os.stat) twice a second. After 2R the pruning
server is in its steady state; "flat" compares the largest size in the second
half of the steady state with the largest in the first half (1.00 = flat), for
both servers. Also: achieved rate and assignment latency, pruning against off.

(b) Dispatch throughput while pruning: scenario 1's 16-agent unary run (10,000
tasks; quick 2,000) on a copy of a file already holding a backlog of finished
tasks (300,000; quick 50,000; bench/prefill.py), served with a 10 s retention
(so the backlog is being pruned throughout the measured window: the rows left
are counted before and after) and with retention off; the two alternate within
each repeat. The check is the ratio of median throughputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import prefill
from bench.common import Context, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "retention"
TITLE = "8. Retention: file size at steady load, dispatch while pruning"

RATE = 200  # tasks/s offered in (a), well below saturation on 2 cores
SAMPLE_EVERY_S = 0.5
# Checks: the pruning server's file grows at most this much over its steady
# state; pruning keeps at least this share of the throughput with it off.
MAX_STEADY_GROWTH = 1.10
MIN_THROUGHPUT_RATIO = 0.90


def _bytes(db: Path) -> tuple[int, int]:
    out = []
    for p in (db, Path(f"{db}-wal")):
        try:
            out.append(os.stat(p).st_size)
        except OSError:
            out.append(0)
    return out[0], out[1]


@contextlib.contextmanager
def sampling(db: Path) -> Iterator[list[tuple[float, int, int]]]:
    """(seconds since start, database bytes, WAL bytes), twice a second."""
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def loop() -> None:
        while True:
            samples.append((time.monotonic() - t0, *_bytes(db)))
            if stop.wait(SAMPLE_EVERY_S):
                return

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(timeout=10)


def _steady(samples: list[tuple[float, int, int]], settle: float, end: float) -> dict[str, float]:
    mid = settle + (end - settle) / 2
    first = [db + wal for t, db, wal in samples if settle <= t < mid]
    second = [db + wal for t, db, wal in samples if mid <= t <= end]
    if not first or not second:
        raise RuntimeError(f"too few size samples between {settle:.0f} s and {end:.0f} s")
    return {
        "first_half_max_mib": max(first) / 2**20,
        "second_half_max_mib": max(second) / 2**20,
        "growth": max(second) / max(first),
        "final_mib": (samples[-1][1] + samples[-1][2]) / 2**20,
        "final_db_mib": samples[-1][1] / 2**20,
        "final_wal_mib": samples[-1][2] / 2**20,
    }


def _steady_load(ctx: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    seconds = 30 if ctx.quick else 120
    keep = 5 if ctx.quick else 20
    settle = 2 * keep
    runs: dict[str, dict[str, Any]] = {}
    timelines: dict[str, list[tuple[float, int, int]]] = {}
    for name, extra in (
        (f"retention {keep}s", ("--retention", f"{keep}s")),
        ("retention off", ("--retention", "off")),
    ):
        tag = f"s8a-{'on' if extra[1] != 'off' else 'off'}"
        with opscore_server(ctx.work_dir, tag=tag, extra=extra) as srv:
            with sampling(srv.db) as samples:
                started = time.monotonic()
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=16,
                    n_tasks=RATE * seconds,
                    mode="unary",
                    rate=RATE,
                    timeout_s=seconds * 2 + 30,
                )
                run_end = time.monotonic() - started
        remove_db(srv.db)
        # Sample times count from before the agents' setup: shift them so that 0
        # is the first enqueue, as the run's own clock has it.
        setup = max(0.0, run_end - r["elapsed_s"])
        timeline = [(t - setup, db, wal) for t, db, wal in samples if t >= setup]
        timelines[name] = timeline
        r["size"] = _steady(timeline, settle, r["elapsed_s"])
        r["latency"] = r.pop("assign_latency")
        runs[name] = r
        ctx.say(
            f"  {name}: {r['tasks_per_s']:.0f} tasks/s, file {r['size']['final_mib']:.1f} MiB, "
            f"steady growth {r['size']['growth']:.2f}"
        )
    on, off = runs[f"retention {keep}s"], runs["retention off"]
    configs = []
    for name, r in runs.items():
        configs.append(
            {
                "name": f"steady load {RATE} tasks/s for {seconds} s, {name}",
                "params": {"rate": RATE, "seconds": seconds, "retention": name, "agents": 16},
                "metrics": {
                    "achieved_tasks_per_s": metric([r["tasks_per_s"]], "tasks/s"),
                    "file_final_mib": metric([r["size"]["final_mib"]], "MiB", "lower"),
                    "file_max_first_half_of_steady_state_mib": metric(
                        [r["size"]["first_half_max_mib"]], "MiB", "lower"
                    ),
                    "file_max_second_half_of_steady_state_mib": metric(
                        [r["size"]["second_half_max_mib"]], "MiB", "lower"
                    ),
                    "assign_p50_ms": metric([r["latency"]["p50_ms"]], "ms", "lower"),
                    "assign_p99_ms": metric([r["latency"]["p99_ms"]], "ms", "lower"),
                },
                "runs": [r],
            }
        )
    ratios = [
        {
            "name": f"file growth over the steady state, retention {keep}s (1.00 = flat)",
            "value": on["size"]["growth"],
        },
        {
            "name": "file growth over the same window, retention off",
            "value": off["size"]["growth"],
        },
        {
            "name": f"final file size, retention {keep}s / off",
            "value": on["size"]["final_mib"] / off["size"]["final_mib"],
        },
        {
            "name": f"achieved tasks/s, retention {keep}s / off (same offered rate)",
            "value": on["tasks_per_s"] / off["tasks_per_s"],
        },
        {
            "name": f"assignment latency p99, retention {keep}s / off",
            "value": on["latency"]["p99_ms"] / max(1e-9, off["latency"]["p99_ms"]),
        },
    ]
    notes = [
        f"(a) {RATE} tasks/s offered for {seconds} s to 16 agents; sizes are the database "
        f"file plus its WAL, sampled every {SAMPLE_EVERY_S} s; steady state from {settle} s "
        f"(2 x retention) to the last completion, split in two halves.",
    ]
    _plot(ctx.out_dir, timelines, keep, settle)
    return configs, ratios, notes


def _backlog_left(db: Path, before_us: int) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        sql = "SELECT COUNT(*) FROM tasks WHERE create_time < ?"
        return int(conn.execute(sql, (before_us,)).fetchone()[0])
    finally:
        conn.close()


def _while_pruning(
    ctx: Context,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], bool]:
    backlog = 50_000 if ctx.quick else 300_000
    n = 2000 if ctx.quick else 10_000
    keep = 10
    with opscore_server(ctx.work_dir, tag="s8b-template") as srv:
        pass
    template = srv.db
    secs = prefill.fill(template, backlog)
    prefilled_until = int(time.time() * 1e6)
    ctx.say(f"  prefilled {backlog:,} finished tasks in {secs:.1f} s")
    names = (f"retention {keep}s, pruning the backlog", "retention off")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(ctx.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            on = name.startswith("retention ") and not name.endswith("off")
            tag = f"s8b-r{rep}-{'on' if on else 'off'}"
            db = ctx.work_dir / f"{tag}.db"
            shutil.copyfile(template, db)
            extra = ("--retention", f"{keep}s" if on else "off")
            with opscore_server(ctx.work_dir, db=db, tag=tag, extra=extra) as srv:
                left_before = _backlog_left(db, prefilled_until)
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=ctx.work_dir,
                    tag=tag,
                    n_agents=16,
                    n_tasks=n,
                    mode="unary",
                )
                left_after = _backlog_left(db, prefilled_until)
            remove_db(db)
            r.pop("assign_latency", None)
            r["backlog_left_before"] = left_before
            r["backlog_left_after"] = left_after
            r["backlog_pruned_during_run"] = left_before - left_after
            runs[name].append(r)
            ctx.say(
                f"  {name}: {r['tasks_per_s']:.0f} tasks/s, backlog {left_before:,} -> "
                f"{left_after:,} rows"
            )
    remove_db(template)
    configs = []
    for name in names:
        rs = runs[name]
        configs.append(
            {
                "name": f"16 agents unary, {n:,} tasks, {backlog:,} finished in the file, {name}",
                "params": {"agents": 16, "n_tasks": n, "backlog": backlog, "retention": name},
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                    "backlog_rows_pruned_during_run": metric(
                        [r["backlog_pruned_during_run"] for r in rs], "rows"
                    ),
                },
                "runs": rs,
            }
        )
    on_tp, off_tp = (c["metrics"]["tasks_per_s"]["median"] for c in configs)
    on_cpu, off_cpu = (c["metrics"]["server_cpu_us_per_task"]["median"] for c in configs)
    ratio = on_tp / off_tp if off_tp else 0.0
    pruned_all_along = all(r["backlog_left_after"] > 0 for r in runs[names[0]]) and all(
        r["backlog_pruned_during_run"] > 0 for r in runs[names[0]]
    )
    ratios = [
        {"name": "tasks/s while pruning / retention off (medians)", "value": ratio},
        {
            "name": "server CPU µs per task while pruning / retention off (medians)",
            "value": on_cpu / off_cpu if off_cpu else 0.0,
        },
    ]
    notes = [
        f"(b) {ctx.repeats} repeats, the two alternating; prefill of {backlog:,} finished "
        f"tasks took {secs:.1f} s (bench/prefill.py, one task per ms ending at the prefill: "
        f"all but the last {keep} s of them expired for the {keep} s retention).",
        "Backlog rows left when the run started and when it ended (pruning server): "
        + ", ".join(
            f"{r['backlog_left_before']:,} -> {r['backlog_left_after']:,}" for r in runs[names[0]]
        )
        + (
            "; pruning ran through every measured window."
            if pruned_all_along
            else "; the backlog ran out before a window ended, so pruning did not cover it all."
        ),
    ]
    return configs, ratios, notes, ratio >= MIN_THROUGHPUT_RATIO


def _plot(out: Path, timelines: dict[str, list[tuple[float, int, int]]], keep: int, settle: float):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, samples in timelines.items():
        ax.plot([s[0] for s in samples], [(s[1] + s[2]) / 2**20 for s in samples], label=name)
    ax.axvline(settle, color="grey", linestyle=":", label=f"2 x retention ({settle:.0f} s)")
    ax.set_xlabel("seconds since the first enqueue")
    ax.set_ylabel("database + WAL (MiB)")
    ax.set_title(f"File size at {RATE} tasks/s, retention {keep}s vs off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retention_file_size.png", dpi=110)
    plt.close(fig)


def run(ctx: Context) -> dict[str, Any]:
    a_configs, a_ratios, a_notes = _steady_load(ctx)
    b_configs, b_ratios, b_notes, b_ok = _while_pruning(ctx)
    growth = a_ratios[0]["value"]
    flat = growth <= MAX_STEADY_GROWTH
    throughput = b_ratios[0]["value"]
    problems = []
    if not flat:
        problems.append(
            f"the pruning server's file grew {growth:.2f}x over its steady state "
            f"(bound {MAX_STEADY_GROWTH:.2f})"
        )
    if not b_ok:
        problems.append(
            f"pruning kept {throughput:.1%} of the throughput with retention off "
            f"(bound {MIN_THROUGHPUT_RATIO:.0%})"
        )
    return {
        "title": TITLE,
        "status": "ok" if not problems else "check failed: " + "; ".join(problems),
        "configs": a_configs + b_configs,
        "ratios": a_ratios + b_ratios,
        "check": {
            "steady_growth": growth,
            "max_steady_growth": MAX_STEADY_GROWTH,
            "throughput_ratio": throughput,
            "min_throughput_ratio": MIN_THROUGHPUT_RATIO,
            "passed": not problems,
        },
        "notes": [
            *a_notes,
            *b_notes,
            f"Checks: steady-state growth <= {MAX_STEADY_GROWTH:.2f} "
            f"({'passed' if flat else 'FAILED'}); throughput while pruning >= "
            f"{MIN_THROUGHPUT_RATIO:.0%} of retention off ({'passed' if b_ok else 'FAILED'}).",
        ],
    }
