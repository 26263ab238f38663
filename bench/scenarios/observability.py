"""Scenario 7: the cost of observability (issue 13).

Scenario 1's unary workload (16 agents, EnqueueTask with 64 calls in flight,
every task assigned and completed) against two servers that differ only in
`--metrics-listen`: both off, and metrics on (tracing off), with the endpoint
scraped once a second during the measured window (Prometheus scrapes every 15 s
by default; once a second makes the scrape's cost visible). The configurations
alternate within each repeat, and the check is a ratio of medians from this same
run: metrics on must keep at least 97% of the throughput with both off.

Tracing off costs nothing by construction (no spans, no interceptor hook, the
no-op engine observer): the "both off" server is the tracing-off server.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench.common import Context, free_port, metric, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "observability"
TITLE = "7. Cost of metrics (tracing off)"

# The acceptance bound of issue 13.
MIN_RATIO = 0.97
SCRAPE_EVERY_S = 1.0


@contextlib.contextmanager
def scraping(port: int) -> Iterator[list[int]]:
    """Scrape http://127.0.0.1:PORT/metrics every second until the block ends;
    yields the list of response sizes (one per scrape)."""
    sizes: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SCRAPE_EVERY_S):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    sizes.append(len(r.read()))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield sizes
    finally:
        stop.set()
        t.join(timeout=10)


def run(ctx: Context) -> dict[str, Any]:
    n = 2000 if ctx.quick else 10000
    repeats = max(ctx.repeats, 3 if ctx.quick else 5)
    names = ("metrics off, tracing off", "metrics on (scraped every 1 s), tracing off")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    scrapes: list[int] = []
    for rep in range(repeats):
        # Alternate which goes first, so a trend over the run hits both alike.
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            metrics_on = name.startswith("metrics on")
            port = free_port()
            extra = ("--metrics-listen", f"127.0.0.1:{port}") if metrics_on else ()
            tag = f"s7-r{rep}-{'m' if metrics_on else 'o'}"
            with opscore_server(ctx.work_dir, tag=tag, extra=extra) as srv:
                scraper = scraping(port) if metrics_on else contextlib.nullcontext([])
                with scraper as sizes:
                    r = run_dispatch(
                        target=srv.target,
                        server_pid=srv.pid,
                        work_dir=ctx.work_dir,
                        tag=tag,
                        n_agents=16,
                        n_tasks=n,
                        mode="unary",
                    )
                if metrics_on:
                    if not sizes:
                        raise RuntimeError("the metrics endpoint was never scraped")
                    scrapes += sizes
            remove_db(srv.db)
            r.pop("assign_latency", None)
            runs[name].append(r)
            ctx.say(f"  {name}: {r['tasks_per_s']:.0f} tasks/s")
    configs = []
    for name in names:
        rs = runs[name]
        configs.append(
            {
                "name": name,
                "params": {"agents": 16, "mode": "unary", "n_tasks": n},
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                },
                "runs": rs,
            }
        )
    off, on = (c["metrics"]["tasks_per_s"]["median"] for c in configs)
    ratio = on / off if off else 0.0
    cpu_off, cpu_on = (c["metrics"]["server_cpu_us_per_task"]["median"] for c in configs)
    passed = ratio >= MIN_RATIO
    ctx.say(f"  metrics on / off: {ratio:.3f} ({'ok' if passed else 'BELOW'} {MIN_RATIO})")
    return {
        "title": TITLE,
        "status": "ok"
        if passed
        else f"check failed: metrics on kept {ratio:.1%} of the throughput, below {MIN_RATIO:.0%}",
        "configs": configs,
        "ratios": [
            {"name": "metrics on / both off (tasks/s, medians)", "value": ratio},
            {
                "name": "metrics on / both off (server CPU µs per task, medians)",
                "value": cpu_on / cpu_off if cpu_off else 0.0,
            },
        ],
        "check": {"ratio": ratio, "min_ratio": MIN_RATIO, "passed": passed},
        "notes": [
            f"{repeats} repeats, the two configurations alternating; {n} tasks per run, "
            "16 agents, unary EnqueueTask with 64 calls in flight (as in scenario 1).",
            f"Scrapes during the metrics-on runs: {len(scrapes)}, "
            f"{(sum(scrapes) // max(1, len(scrapes)))} bytes each on average.",
            f"Check: metrics on keeps >= {MIN_RATIO:.0%} of the throughput with both off "
            f"(ratio of medians): {'passed' if passed else 'FAILED'}.",
        ],
    }
