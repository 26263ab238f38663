"""One measured dispatch run: agents subscribed (SubscribeTasks + CompleteTask,
or a Connect work stream: `shape`), N tasks enqueued, every task assigned and
completed. Used by scenarios 1, 2, 5 and 6 (against Ops-Core and
against the bare grpc.aio baseline, which speaks the same protos).

Process layout: the server under test in its own process; the agents in 1
process (1 agent) or 2 processes sharing them (more agents), one gRPC channel and
so one TCP connection per agent; one enqueuer process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchError, CpuMeter, LoadGen, latency_summary, loadgens


def split(n: int, procs: int) -> list[int]:
    procs = max(1, min(procs, n))
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def merge_enqueue_results(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several enqueuers' results as one: the span of all, the worst call times."""
    if len(rs) == 1:
        return rs[0]
    errors: dict[str, int] = {}
    for r in rs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "t_start": min(r["t_start"] for r in rs),
        "t_end": max(r["t_end"] for r in rs),
        "sent": sum(r["sent"] for r in rs),
        "errors": errors,
        "call_p50_ms": max((r["call_p50_ms"] or 0) for r in rs),
        "call_p99_ms": max((r["call_p99_ms"] or 0) for r in rs),
        "max_behind_s": max(r["max_behind_s"] for r in rs),
    }


def agent_procs_for(n_agents: int) -> int:
    return 1 if n_agents == 1 else 2


def run_dispatch(
    *,
    target: str | Sequence[str],
    server_pid: int | Sequence[int],
    work_dir: Path,
    tag: str,
    n_agents: int,
    n_tasks: int,
    mode: str = "unary",
    keyed: bool = False,
    shape: str = "unary",
    rate: float = 0,
    concurrency: int = 64,
    batch_size: int = 1000,
    max_in_flight: int = 1,
    timeout_s: float = 300,
    agent_procs: int | None = None,
    verify: bool = True,
    allow_incomplete: bool = False,
    enqueue_procs: int = 1,
    cpu_groups: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Run once and return the figures (raises BenchError on any failure).

    Several targets (replicas of one database): agent process j and enqueuer k
    talk to target j (k) modulo their number, and the server CPU is that of every
    server pid. `cpu_groups`: more processes to meter (e.g. "postgres": the
    postmaster, whose backends are counted as its children).
    """
    targets = [target] if isinstance(target, str) else list(target)
    server_pids = [server_pid] if isinstance(server_pid, int) else list(server_pid)
    procs = agent_procs or agent_procs_for(n_agents)
    cap = "bench"
    agents = [
        LoadGen(
            "agents",
            {
                "target": targets[j % len(targets)],
                "n_agents": k,
                "id_prefix": f"{tag}-p{j}",
                "capability": cap,
                "max_in_flight": max_in_flight,
                "shape": shape,
                "agents_per_channel": 1,
                "deadline_s": timeout_s + 120,
                "verify": verify,
            },
            work_dir / f"{tag}-agents{j}.log",
        )
        for j, k in enumerate(split(n_agents, procs))
    ]
    with loadgens(agents):
        for a in agents:
            a.wait_ready()
        enqs = [
            LoadGen(
                "enqueue",
                {
                    "target": targets[k % len(targets)],
                    "n": n_k,
                    "mode": mode,
                    "keyed": keyed,
                    "batch_size": batch_size,
                    "concurrency": concurrency,
                    "rate": rate / len(split(n_tasks, enqueue_procs)) if rate else 0,
                    "capability": cap,
                    "deadline_s": timeout_s,
                },
                work_dir / f"{tag}-enqueue{k}.log",
            )
            for k, n_k in enumerate(split(n_tasks, enqueue_procs))
        ]
        with loadgens(enqs):
            for e in enqs:
                e.wait_ready()
            meter = CpuMeter(
                {
                    "server": server_pids,
                    "loadgen": [g.pid for g in [*agents, *enqs]],
                    **(cpu_groups or {}),
                }
            )
            meter.start()
            for e in enqs:
                e.send("GO")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if sum(a.progress for a in agents) >= n_tasks:
                    break
                if any(e.done() and e.result is None for e in enqs):
                    break
                if any(a.done() for a in agents):
                    break
                time.sleep(0.01)
            meter.stop()
            for a in agents:
                a.send("STOP")
            eress = [e.wait_result(timeout=60) for e in enqs]
            ares = [a.wait_result(timeout=120) for a in agents]
    completed = sum(r["completed"] for r in ares)
    eres = merge_enqueue_results(eress)
    errors: dict[str, int] = {}
    for r in [*ares, {"errors": {f"Enqueue {k}": v for k, v in eres["errors"].items()}}]:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    stream_ends: dict[str, int] = {}
    for r in ares:
        for k, v in r["stream_ends"].items():
            stream_ends[k] = stream_ends.get(k, 0) + v
    if completed == 0 or (completed < n_tasks and not allow_incomplete):
        raise BenchError(
            f"{tag}: only {completed}/{n_tasks} tasks completed within {timeout_s:.0f}s "
            f"(errors {errors}, streams {stream_ends})"
        )
    last = max(r["last_complete_t"] for r in ares)
    elapsed = last - eres["t_start"]
    lat = [x for r in ares for x in r["assign_latencies_s"]]
    cpu = meter.result()
    out = {
        "shape": shape,
        "max_in_flight": max_in_flight,
        "n_tasks": n_tasks,
        "completed_fraction": completed / n_tasks,
        "completed": completed,
        "elapsed_s": elapsed,
        "tasks_per_s": completed / elapsed,
        "enqueue_s": eres["t_end"] - eres["t_start"],
        "enqueue_per_s": eres["sent"] / max(1e-9, eres["t_end"] - eres["t_start"]),
        "enqueue_call_p50_ms": eres["call_p50_ms"],
        "enqueue_call_p99_ms": eres["call_p99_ms"],
        "enqueuer_max_behind_s": eres["max_behind_s"],
        "complete_rpc_p50_ms": max((r["complete_rpc_p50_ms"] or 0) for r in ares),
        "assign_latency": latency_summary(lat),
        "errors": errors,
        "stream_ends": stream_ends,
        "agent_setup_s": max(r["ready_s"] for r in ares),
        "cpu": cpu,
        "server_cpu_us_per_task": cpu["server_cpu_s"] / completed * 1e6,
        "loadgen_cpu_us_per_task": cpu["loadgen_cpu_s"] / completed * 1e6,
        "agent_processes": len(agents),
        "agents_per_process": [a.config["n_agents"] for a in agents],
        "enqueue_processes": len(enqs),
        "servers": len(server_pids),
    }
    for name in cpu_groups or {}:
        out[f"{name}_cpu_us_per_task"] = cpu[f"{name}_cpu_s"] / completed * 1e6
    if errors:
        out["note"] = f"errors during the run: {errors}"
    if completed < n_tasks:
        out["note"] = (
            f"did not keep up: {completed}/{n_tasks} tasks completed within the "
            f"{timeout_s:.0f} s bound; {out.get('note', '')}"
        )
    return out
