"""Scenario 6: baselines, measured in the same run as Ops-Core and interleaved
with it (each repeat runs Ops-Core, bare grpc.aio and Celery back to back), so
every ratio compares figures taken minutes apart on the same machine.

(a) bare grpc.aio (bench/baselines/bare_grpc.py): same protos, same load
    generator processes, same messages, no storage and no logic: the ceiling.
    On uvloop, as the server under test. Two message patterns: the unary shape
    (SubscribeTasks + unary CompleteTask, unary EnqueueTask) and the work stream
    (bidirectional Connect, batched EnqueueTasks; assignments out, completions
    back, each acknowledged, batched the same way as Ops-Core batches).
(b) Celery 5, Redis broker and result backend (Debian's redis-server, started
    here on a loopback port and stopped by PID), acks_late=True, prefetch 1,
    a prefork worker with as many processes as Ops-Core has agents; one producer
    process sends the same N tasks (apply_async, same input payload) and the run
    ends when the result backend holds N results.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    REPO_ROOT,
    BenchError,
    Context,
    CpuMeter,
    LoadGen,
    _bench_env,
    bare_server,
    free_port,
    loadgens,
    metric,
    opscore_server,
    remove_db,
)
from bench.dispatch_run import run_dispatch

NAME = "baselines"
TITLE = "6. Baselines: bare grpc.aio and Celery + Redis"


def celery_missing() -> str | None:
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        return (
            f"Celery baseline not run: Python package missing ({e.name}); `make bench` installs it"
        )
    if not shutil.which("redis-server"):
        return (
            "Celery baseline not run: redis-server is not installed (apt-get install redis-server)"
        )
    return None


@contextlib.contextmanager
def redis_server(work: Path, tag: str) -> Iterator[tuple[int, int]]:
    """Debian's redis-server on 127.0.0.1 with its default persistence settings
    (RDB snapshots, no AOF); stopped with SIGTERM by PID."""
    import redis

    port = free_port()
    d = work / f"{tag}-redis"
    d.mkdir(exist_ok=True)
    log = open(work / f"{tag}-redis.log", "ab")
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(d),
            "--daemonize",
            "no",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        client = redis.Redis(host="127.0.0.1", port=port)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise BenchError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield port, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def run_celery(ctx: Context, tag: str, workers: int, n: int) -> dict[str, Any]:
    with redis_server(ctx.work_dir, tag) as (port, redis_pid):
        broker = f"redis://127.0.0.1:{port}/0"
        backend = f"redis://127.0.0.1:{port}/1"
        flag = ctx.work_dir / f"{tag}-celery-ready"
        env = {
            **_bench_env(),
            "BENCH_CELERY_BROKER": broker,
            "BENCH_CELERY_BACKEND": backend,
            "BENCH_CELERY_READY": str(flag),
        }
        log = open(ctx.work_dir / f"{tag}-celery-worker.log", "ab")
        worker = subprocess.Popen(
            [
                PY,
                "-m",
                "celery",
                "-A",
                "bench.baselines.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(workers),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
                "-n",
                f"{tag}@bench",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 120
            while not flag.exists():
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise BenchError("celery worker did not become ready")
                time.sleep(0.05)
            prod = LoadGen(
                "celery",
                {"broker": broker, "backend": backend, "n": n, "deadline_s": 300},
                ctx.work_dir / f"{tag}-celery-producer.log",
            )
            with loadgens([prod]):
                prod.wait_ready()
                meter = CpuMeter({"server": [redis_pid, worker.pid], "loadgen": [prod.pid]})
                meter.start()
                prod.send("GO")
                res = prod.wait_result(timeout=400)
                meter.stop()
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait(timeout=10)
            log.close()
            flag.unlink(missing_ok=True)
    if res["completed"] < n:
        raise BenchError(f"celery: only {res['completed']}/{n} results within the deadline")
    cpu = meter.result({"loadgen": res["cpu_s"]})
    return {
        "tasks_per_s": n / (res["t_end"] - res["t_start"]),
        "send_per_s": n / (res["t_sent"] - res["t_start"]),
        "cpu": cpu,
        "server_cpu_us_per_task": cpu["server_cpu_s"] / n * 1e6,
        **res,
    }


# (shape, enqueue mode, max_in_flight) of each message pattern.
PATTERNS = {
    "unary": ("unary", "unary", 1),
    "stream": ("stream", "batch", 1),
    "stream4": ("stream", "batch", 4),
}
PATTERN_NAMES = {
    "unary": "unary shape, EnqueueTask",
    "stream": "work stream, EnqueueTasks, max_in_flight 1",
    "stream4": "work stream, EnqueueTasks, max_in_flight 4",
}


def run_bare(ctx: Context, tag: str, agents: int, n: int, pattern: str) -> dict[str, Any]:
    shape, mode, mif = PATTERNS[pattern]
    with bare_server(ctx.work_dir, tag) as srv:
        return run_dispatch(
            target=srv.target,
            server_pid=srv.pid,
            work_dir=ctx.work_dir,
            tag=tag,
            n_agents=agents,
            n_tasks=n,
            mode=mode,
            shape=shape,
            max_in_flight=mif,
        )


def run_opscore(ctx: Context, tag: str, agents: int, n: int, pattern: str) -> dict[str, Any]:
    shape, mode, mif = PATTERNS[pattern]
    with opscore_server(ctx.work_dir, tag=tag) as srv:
        r = run_dispatch(
            target=srv.target,
            server_pid=srv.pid,
            work_dir=ctx.work_dir,
            tag=tag,
            n_agents=agents,
            n_tasks=n,
            mode=mode,
            shape=shape,
            max_in_flight=mif,
        )
    remove_db(srv.db)
    return r


# Issue 10: Ops-Core's work stream keeps at least this share of the bare one.
MIN_STREAM_RATIO = 0.5


def run(ctx: Context) -> dict[str, Any]:
    n = 2000 if ctx.quick else 10000
    n_stream = 6000 if ctx.quick else 30000
    missing = celery_missing()
    # (pattern, agents, systems): the unary shape against Celery too.
    plan: list[tuple[str, int, list[str]]] = []
    unary_systems = ["opscore", "bare", "celery"] if missing is None else ["opscore", "bare"]
    for a in [16] if ctx.quick else [1, 16]:
        plan.append(("unary", a, unary_systems))
    plan.append(("stream", 16, ["opscore", "bare"]))
    plan.append(("stream4", 16, ["opscore", "bare"]))
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    failures: dict[tuple[str, str, int], str] = {}
    for rep in range(ctx.repeats):
        for pattern, a, systems in plan:
            count = n if pattern == "unary" else n_stream
            for sysname in systems:
                key = (sysname, pattern, a)
                if key in failures:
                    continue
                tag = f"s6-r{rep}-{sysname}-{pattern}-{a}"
                try:
                    if sysname == "opscore":
                        r = run_opscore(ctx, tag, a, count, pattern)
                    elif sysname == "bare":
                        r = run_bare(ctx, tag, a, count, pattern)
                    else:
                        r = run_celery(ctx, tag, a, count)
                except BenchError as e:
                    failures[key] = str(e).splitlines()[0]
                    ctx.say(f"  {sysname} {pattern} {a}: FAILED {failures[key]}")
                    continue
                r.pop("assign_latency", None)
                runs.setdefault(key, []).append(r)
                ctx.say(
                    f"  {sysname}, {PATTERN_NAMES[pattern]}, {a} agents/workers: "
                    f"{r['tasks_per_s']:.0f} tasks/s"
                )
    names = {
        "opscore": "Ops-Core (durable, sync=full)",
        "bare": "bare grpc.aio on uvloop (no storage, no logic)",
        "celery": "Celery 5 + Redis (acks_late, prefork)",
    }
    cfgs = []
    for (sysname, pattern, a), rs in runs.items():
        what = "apply_async" if sysname == "celery" else PATTERN_NAMES[pattern]
        unit = "worker process" if sysname == "celery" else "agent"
        cfgs.append(
            {
                "name": f"{names[sysname]}, {what}, {a} {unit}{'' if a == 1 else 's'}",
                "params": {"system": sysname, "pattern": pattern, "agents": a},
                "metrics": {
                    "tasks_per_s": metric([r["tasks_per_s"] for r in rs], "tasks/s"),
                    "server_cores": metric(
                        [r["cpu"]["server_cores"] for r in rs], "cores", "lower"
                    ),
                    "loadgen_cores": metric(
                        [r["cpu"]["loadgen_cores"] for r in rs], "cores", "lower"
                    ),
                    "server_cpu_us_per_task": metric(
                        [r["server_cpu_us_per_task"] for r in rs], "µs", "lower"
                    ),
                },
                "runs": rs,
            }
        )

    def med(s: str, pattern: str, a: int) -> float | None:
        rs = runs.get((s, pattern, a))
        return metric([r["tasks_per_s"] for r in rs], "")["median"] if rs else None

    ratios = []
    targets = []
    for pattern, a, _ in plan:
        o, b, c = med("opscore", pattern, a), med("bare", pattern, a), med("celery", pattern, a)
        if o and b:
            ratios.append(
                {
                    "name": f"{a} agents, {PATTERN_NAMES[pattern]}: Ops-Core / bare grpc.aio",
                    "value": o / b,
                }
            )
            if pattern != "unary":
                targets.append(
                    {
                        "target": f"work stream ≥ {MIN_STREAM_RATIO} of bare grpc.aio "
                        f"bidirectional, 16 agents ({PATTERN_NAMES[pattern]})",
                        "measured": f"{o / b:.3f} ({o:,.0f} / {b:,.0f} tasks/s)",
                        "met": o / b >= MIN_STREAM_RATIO,
                    }
                )
        if o and c:
            ratios.append({"name": f"{a} agent(s), unary: Ops-Core / Celery", "value": o / c})
    notes = [
        "Each repeat runs the systems back to back with the same N; ratios are of the "
        "medians of this run.",
        "The bare grpc.aio server runs on uvloop, like Ops-Core's server (before issue 10 "
        "it ran on asyncio).",
        "Work-stream pattern, in both servers: hello, accepted, then assignments out and "
        "completions back on one bidirectional stream, each completion answered with an "
        "AgentMessageResult; whatever is ready when a stream is written goes in one "
        "message; the agent sends the completions of one received message as one message.",
        "For Celery the 'server' CPU is redis-server plus the worker pool (the workers "
        "are the agents there); the load generator is the producer process.",
        "Durability differs: Ops-Core commits every enqueue, assignment and completion "
        "with fsync (synchronous=FULL) before replying; Redis runs with its default "
        "persistence (periodic RDB snapshots, no AOF), so a crash can lose acknowledged "
        "Celery tasks. bare grpc.aio stores nothing.",
    ]
    if missing:
        notes.append(missing)
    for (s, pattern, a), why in failures.items():
        notes.append(f"{names[s]}, {PATTERN_NAMES[pattern]}, {a}: failed: {why}")
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": ratios,
        "targets": targets,
        "notes": notes,
    }
