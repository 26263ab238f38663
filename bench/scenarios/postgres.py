"""Scenario 13 (issue 11): the PostgreSQL backend against SQLite, and two
replicas against one, in the same run.

Work-stream agents (Connect, max_in_flight 1), 16 of them in 2 processes,
batched enqueue (EnqueueTasks, 1,000 per call) from 2 enqueuer processes, N
tasks, every one assigned and completed (as scenario 1). Three configurations
interleaved within each repeat so that machine noise hits them alike:

- SQLite: one server on a fresh file, durable defaults (synchronous=FULL);
- PostgreSQL, 1 replica: one server on a fresh database of a throwaway cluster;
- PostgreSQL, 2 replicas: two servers on one fresh database; agent process j and
  enqueuer k talk to replica j (k), so half the agents and half the enqueues are on
  each, and a task enqueued on one replica may go to an agent on the other.

and diagnostics, not deployments: PostgreSQL with synchronous_commit off for the
database (how much is waiting for the WAL flush), and SQLite and PostgreSQL with
max_in_flight 4 (how much is each task's round trip rather than CPU).

The cluster is started by this scenario (tests/support/pg.py: initdb into a temp
dir, on a free loopback port, as the `postgres` OS user when root) and removed at
the end; never a system-wide server. It is durable like the SQLite default
(fsync and synchronous_commit on), with PostgreSQL's default shared_buffers.

CPU per task: the server process(es), and every process of the cluster (the
postmaster and its children: the backends serving the replicas' pools, the WAL
writer, checkpointer, ...), psutil user+system seconds over the measured
window. Their sum is what one task costs the machine apart from the load
generators, so a reader can project a bigger one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Context,
    ServerUnderTest,
    Unavailable,
    metric,
    opscore_server,
    remove_db,
)
from bench.dispatch_run import run_dispatch

NAME = "postgres"
TITLE = "13. PostgreSQL backend: against SQLite, two replicas against one"

AGENTS = 16
TARGET_PG_VS_SQLITE = 0.5
# PostgreSQL's own default (tests/support/pg.py keeps test clusters at 32MB).
CLUSTER_SETTINGS = {"shared_buffers": "'128MB'"}


def configs(quick: bool) -> list[dict[str, Any]]:
    n = 6000 if quick else 30000
    return [
        {"backend": "sqlite", "replicas": 1, "n_tasks": n},
        {"backend": "postgres", "replicas": 1, "n_tasks": n},
        {"backend": "postgres", "replicas": 2, "n_tasks": n},
        # A diagnostic, not a deployment: commits that do not wait for their WAL
        # flush, to tell how much of the time is waiting for fsync.
        {"backend": "postgres", "replicas": 1, "n_tasks": n, "synchronous_commit": "off"},
        # Also diagnostics: 4 tasks in flight per agent. If PostgreSQL's figure rises
        # much more than SQLite's, max_in_flight 1 was bound by each task's round
        # trip through the server and the database, not by CPU.
        {"backend": "sqlite", "replicas": 1, "n_tasks": n, "mif": 4},
        {"backend": "postgres", "replicas": 1, "n_tasks": n, "mif": 4},
    ]


def label(c: dict[str, Any]) -> str:
    if c["backend"] == "sqlite":
        where = "SQLite (durable defaults), 1 server"
    else:
        replicas = "1 replica" if c["replicas"] == 1 else f"{c['replicas']} replicas"
        where = f"PostgreSQL, {replicas} on one database"
        if c.get("synchronous_commit") == "off":
            where += " (diagnostic: synchronous_commit off, not durable)"
    return f"{where}, work stream, {AGENTS} agents, max_in_flight {c.get('mif', 1)}, EnqueueTasks"


def postmaster_pid(data_dir: Path) -> int:
    """The cluster's postmaster (first line of postmaster.pid); its children are
    every other process of the cluster."""
    try:
        return int(Path(data_dir, "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError) as e:
        raise BenchError(f"no postmaster.pid in {data_dir}: {e}") from e


@contextlib.contextmanager
def cluster() -> Iterator[Any]:
    try:
        from tests.support.pg import find_bindir, pg_cluster
    except ImportError as e:  # a checkout without the tests or without pytest
        raise Unavailable(f"tests/support/pg.py cannot be imported: {e}") from e
    if find_bindir() is None:
        raise Unavailable(
            "PostgreSQL is not installed (no initdb): `make postgres` installs Debian's"
        )
    with pg_cluster(settings=CLUSTER_SETTINGS) as pg:
        yield pg


@contextlib.contextmanager
def servers(ctx: Context, c: dict[str, Any], pg: Any, tag: str) -> Iterator[list[ServerUnderTest]]:
    """The server(s) of one configuration, on a fresh file or database."""
    if c["backend"] == "sqlite":
        with opscore_server(ctx.work_dir, tag=tag) as srv:
            yield [srv]
        remove_db(srv.db)
        return
    name = pg.create_database()
    if c.get("synchronous_commit"):
        # For the connections the replicas open to this database only.
        pg.sql(f'ALTER DATABASE "{name}" SET synchronous_commit = {c["synchronous_commit"]}')
    url = pg.url(name)
    with contextlib.ExitStack() as stack:
        # One after the other: the first applies the migrations, the second finds
        # them applied (starting both at once is the tests' business).
        srvs = [
            stack.enter_context(opscore_server(ctx.work_dir, db=url, tag=f"{tag}-r{i}"))  # type: ignore[arg-type]
            for i in range(c["replicas"])
        ]
        yield srvs
    pg.drop_database(name)


def summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
        "server_cpu_us_per_task": metric(
            [r["server_cpu_us_per_task"] for r in rs], "µs (all replicas)", "lower"
        ),
        "server_cores": metric([r["cpu"]["server_cores"] for r in rs], "cores", "lower"),
    }
    if "postgres_cpu_us_per_task" in rs[0]:
        out["postgres_cpu_us_per_task"] = metric(
            [r["postgres_cpu_us_per_task"] for r in rs], "µs (whole cluster)", "lower"
        )
        out["postgres_cores"] = metric([r["cpu"]["postgres_cores"] for r in rs], "cores", "lower")
        out["server_plus_postgres_us_per_task"] = metric(
            [r["server_cpu_us_per_task"] + r["postgres_cpu_us_per_task"] for r in rs],
            "µs",
            "lower",
        )
    out["loadgen_cores"] = metric([r["cpu"]["loadgen_cores"] for r in rs], "cores", "lower")
    out["complete_p50_ms"] = metric([r["complete_rpc_p50_ms"] for r in rs], "ms", "lower")
    return out


def run(ctx: Context) -> dict[str, Any]:
    cfgs = configs(ctx.quick)
    runs: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    with cluster() as pg:
        pm = postmaster_pid(pg.data_dir)
        version = pg.sql("SHOW server_version")
        for rep in range(ctx.repeats):
            for i, c in enumerate(cfgs):
                tag = f"s12-r{rep}-c{i}"
                with servers(ctx, c, pg, tag) as srvs:
                    r = run_dispatch(
                        target=[s.target for s in srvs],
                        server_pid=[s.pid for s in srvs],
                        work_dir=ctx.work_dir,
                        tag=tag,
                        n_agents=AGENTS,
                        n_tasks=c["n_tasks"],
                        mode="batch",
                        shape="stream",
                        max_in_flight=c.get("mif", 1),
                        enqueue_procs=2,
                        cpu_groups={"postgres": [pm]} if c["backend"] == "postgres" else None,
                    )
                r.pop("assign_latency", None)
                runs[i].append(r)
                pg_cpu = (
                    f", postgres {r['postgres_cpu_us_per_task']:.0f} µs"
                    if "postgres_cpu_us_per_task" in r
                    else ""
                )
                ctx.say(
                    f"  {label(c)}: {r['tasks_per_s']:.0f} tasks/s, "
                    f"server {r['server_cpu_us_per_task']:.0f} µs CPU/task{pg_cpu}"
                )
        # What the cluster complained about during the run (it logs from WARNING).
        complaints = [
            line
            for line in pg.log_tail(100_000).splitlines()
            if any(word in line for word in ("WARNING:", "ERROR:", "FATAL:", "PANIC:"))
        ]
    out_cfgs = [
        {"name": label(c), "params": c, "metrics": summarize(rs), "runs": rs}
        for c, rs in zip(cfgs, runs, strict=True)
    ]

    def med(i: int, key: str = "tasks_per_s") -> float:
        return out_cfgs[i]["metrics"][key]["median"]

    sqlite, pg1, pg2 = med(0), med(1), med(2)
    ratios = [
        {"name": "PostgreSQL 1 replica / SQLite (tasks/s)", "value": pg1 / sqlite},
        {"name": "PostgreSQL 2 replicas / 1 replica (tasks/s)", "value": pg2 / pg1},
        {
            "name": "PostgreSQL 1 replica / SQLite (server CPU µs per task)",
            "value": med(1, "server_cpu_us_per_task") / med(0, "server_cpu_us_per_task"),
        },
        {
            "name": "PostgreSQL 1 replica: cluster CPU / server CPU (per task)",
            "value": med(1, "postgres_cpu_us_per_task") / med(1, "server_cpu_us_per_task"),
        },
        {
            "name": "PostgreSQL 1 replica: synchronous_commit off / on (tasks/s; what waiting "
            "for the WAL flush costs)",
            "value": med(3) / pg1,
        },
        {
            "name": "max_in_flight 4: PostgreSQL 1 replica / SQLite (tasks/s)",
            "value": med(5) / med(4),
        },
        {
            "name": "PostgreSQL 1 replica: max_in_flight 4 / 1 (tasks/s)",
            "value": med(5) / pg1,
        },
        {
            "name": "SQLite: max_in_flight 4 / 1 (tasks/s)",
            "value": med(4) / sqlite,
        },
    ]
    targets = [
        {
            "issue": 11,
            "target": f"PostgreSQL, 1 replica ≥ {TARGET_PG_VS_SQLITE}x SQLite, work stream, "
            f"{AGENTS} agents, batched enqueue",
            "measured": f"{pg1 / sqlite:.2f} ({pg1:,.0f} / {sqlite:,.0f} tasks/s)",
            "met": pg1 / sqlite >= TARGET_PG_VS_SQLITE,
        },
        {
            "issue": 11,
            "target": "2 replicas on one database against 1 (reported, no bound; "
            f"{ctx.machine['cpu_count']} cores for both replicas, PostgreSQL and the load)",
            "measured": f"{pg2 / pg1:.2f} ({pg2:,.0f} / {pg1:,.0f} tasks/s)",
            "met": None,
        },
        {
            "issue": 11,
            "target": "CPU per task, PostgreSQL 1 replica: server + cluster (reported)",
            "measured": f"{med(1, 'server_cpu_us_per_task'):,.0f} + "
            f"{med(1, 'postgres_cpu_us_per_task'):,.0f} µs "
            f"(SQLite server: {med(0, 'server_cpu_us_per_task'):,.0f} µs); "
            f"2 replicas: {med(2, 'server_cpu_us_per_task'):,.0f} + "
            f"{med(2, 'postgres_cpu_us_per_task'):,.0f} µs",
            "met": None,
        },
    ]
    return {
        "title": TITLE,
        "status": "ok",
        "configs": out_cfgs,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            f"PostgreSQL {version}, a throwaway cluster started by this scenario "
            "(tests/support/pg.py), on 127.0.0.1 over TCP; fsync and synchronous_commit on "
            "(durable, like SQLite's synchronous=FULL), shared_buffers 128MB; a fresh "
            "database per run, created from template0; the servers' pool settings are "
            "Ops-Core's defaults.",
            f"{AGENTS} work-stream agents (max_in_flight 1) in 2 processes, one channel each; "
            "2 enqueuer processes (EnqueueTasks, 1,000 per call, 64 calls in flight "
            "each), in every configuration so that they differ only in the servers. With "
            "2 replicas, agent process j and enqueuer j talk to replica j.",
            "The synchronous_commit off configuration is a diagnostic (a commit then "
            "returns before its WAL is flushed: a crash of PostgreSQL can lose acknowledged "
            "work); its ratio to the durable one says how much of the time is spent "
            "waiting for the WAL flush (fsync) rather than computing.",
            "Server CPU: the sum over the replicas. Cluster CPU: the postmaster and all its "
            "children (backends, WAL writer, checkpointer, ...), psutil user+system "
            "seconds over the measured window.",
            "The machine has "
            f"{ctx.machine['cpu_count']} cores shared by the server(s), PostgreSQL and the "
            "load generators, so two replicas compete for the same cores: the 2 / 1 ratio "
            "says what a second replica costs here, not how it scales on more cores; "
            "project that from the CPU per task.",
            f"The cluster logged {len(complaints)} warnings or errors during the run"
            + (": " + " | ".join(complaints[-5:]) if complaints else "."),
        ],
    }
