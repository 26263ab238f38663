"""One module per scenario; each has NAME, TITLE and run(ctx) -> result body."""

from bench.scenarios import (
    baselines,
    eventloop,
    latency,
    lifecycle,
    logging_cost,
    observability,
    postgres,
    profile,
    retention,
    scale,
    soak,
    soak_history,
    throughput,
    workflows,
)

ALL = [
    throughput,
    latency,
    workflows,
    lifecycle,
    scale,
    baselines,
    observability,
    retention,
    soak,
    soak_history,
    logging_cost,
    eventloop,
    profile,
    postgres,
]
BY_NAME = {m.NAME: m for m in ALL}
