"""Scenario 9: soak, a steady 200 tasks/s with 200 agents for 30 minutes.

Unary shape (SubscribeTasks + CompleteTask, max_in_flight 1), durable defaults,
one open-loop enqueuer offering 200 unary EnqueueTask calls per second for 30
minutes (quick: 2 minutes): 360,000 tasks. Enqueue -> assignment latency is
grouped by one-minute windows of the enqueue time (quick: 15 s); the check
(issue 10): the p99 of the last three windows (quick: two) is at most 1.2 x the
p99 of the first three.

To find out why a p99 drifts, the run also records, once a second, the server's
CPU time, RSS and disk writes (psutil), the database and WAL file sizes, the
load generators' CPU time, and, twenty times a second, the WAL index header in
the -shm file (frames in the WAL, checkpointed frames, WAL restarts: read-only,
the server never notices). The server runs under bench.tools.gcserve, which
records the garbage collector's pauses (and, rarely, the number of objects it
tracks). py-spy samples the server (nonblocking, with idle threads) for a while
near the start and near the end. Everything is reported per window.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import pyspy
from bench.common import (
    BenchError,
    Context,
    LoadGen,
    latency_summary,
    loadgens,
    metric,
    opscore_server,
    remove_db,
)
from bench.dispatch_run import split

NAME = "soak"
TITLE = "9. Soak: a steady 200 tasks/s with 200 agents"

RATE = 200
AGENTS = 200
MAX_DRIFT = 1.2  # last windows' p99 / first windows' p99
# A window in which the open-loop enqueuer started some call later than this was
# a window in which the load generator itself did not get the CPU on time: the
# machine, not the server, was slow then (on a shared 2-core machine that happens).
ON_SCHEDULE_MS = 10.0


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "duration_s": 120,
            "window_s": 15,
            "check_windows": 2,
            "spy_s": 10,
            "control_s": 90,
        }
    return {"duration_s": 1800, "window_s": 60, "check_windows": 3, "spy_s": 30, "control_s": 480}


def history_rows(quick: bool) -> int:
    """The finished tasks a soak leaves behind (every offered task completes)."""
    return RATE * plan(quick)["duration_s"]


def wal_index(shm: Path) -> tuple[int, int, int] | None:
    """(frames in the WAL, frames already checkpointed, WAL salt) from the -shm
    file's header (SQLite's WalIndexHdr and WalCkptInfo, native byte order)."""
    try:
        with open(shm, "rb") as f:
            head = f.read(136)
    except OSError:
        return None
    if len(head) < 136:
        return None
    mx_frame = struct.unpack_from("=I", head, 16)[0]
    salt = struct.unpack_from("=I", head, 32)[0]
    backfill = struct.unpack_from("=I", head, 96)[0]
    return mx_frame, backfill, salt


class Sampler:
    """Samples the server and the load generators in two threads, bounded by stop()."""

    def __init__(self, server_pid: int, db: Path, agents: list[LoadGen], others: list[int]):
        self.server = psutil.Process(server_pid)
        self.db = db
        self.agents = agents
        self.loadgen = [psutil.Process(g.pid) for g in agents] + [psutil.Process(p) for p in others]
        self.samples: list[dict[str, Any]] = []
        # Cumulative WAL counters from the fast thread.
        self.frames_appended = 0
        self.frames_backfilled = 0
        self.checkpoints = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._slow, daemon=True),
            threading.Thread(target=self._fast, daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _fast(self) -> None:
        shm = Path(str(self.db) + "-shm")
        last: tuple[int, int, int] | None = None
        while not self._stop.wait(0.05):
            cur = wal_index(shm)
            if cur is None:
                continue
            if last is not None:
                frames, backfill, salt = cur
                if salt != last[2]:  # the WAL was restarted from its beginning
                    self.restarts += 1
                    self.frames_appended += frames
                    self.frames_backfilled += backfill
                else:
                    self.frames_appended += max(0, frames - last[0])
                    if backfill > last[1]:
                        self.checkpoints += 1
                        self.frames_backfilled += backfill - last[1]
            last = cur

    def _cpu(self, procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += sum(p.cpu_times()[:2])
        return total

    def _slow(self) -> None:
        while True:
            try:
                io = self.server.io_counters()
                main = 0.0
                others = 0.0
                for th in self.server.threads():
                    if th.id == self.server.pid:
                        main += th.user_time + th.system_time
                    else:
                        others += th.user_time + th.system_time
                rec = {
                    "t": time.monotonic(),
                    "server_cpu_s": sum(self.server.cpu_times()[:2]),
                    # The event loop thread, and the rest (SQLite's threads, grpc's poller).
                    "main_thread_cpu_s": main,
                    "other_threads_cpu_s": others,
                    "rss_mib": self.server.memory_info().rss / 2**20,
                    "write_bytes": io.write_bytes,
                    "read_bytes": io.read_bytes,
                    "loadgen_cpu_s": self._cpu(self.loadgen),
                    "completed": sum(g.progress for g in self.agents),
                    "db_bytes": _size(self.db),
                    "wal_bytes": _size(Path(str(self.db) + "-wal")),
                    "frames_appended": self.frames_appended,
                    "frames_backfilled": self.frames_backfilled,
                    "checkpoints": self.checkpoints,
                    "wal_restarts": self.restarts,
                    "loadavg_1m": os.getloadavg()[0],
                }
            except psutil.Error:
                return
            self.samples.append(rec)
            if self._stop.wait(1.0):
                return


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def at(samples: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The last sample taken at or before `t`."""
    best = None
    for s in samples:
        if s["t"] <= t:
            best = s
        else:
            break
    return best


def gc_between(gc_log: list[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """GC collections and pause seconds (all generations) between two times."""
    a = next((r for r in reversed(gc_log) if r["t"] <= t0), None)
    inside = [r for r in gc_log if t0 < r["t"] <= t1]
    if not inside:
        return {}
    b = inside[-1]

    def tot(r: dict[str, Any] | None, i: int) -> float:
        return sum(g[i] for g in r["gens"]) if r else 0.0

    return {
        "gc_collections": tot(b, 0) - tot(a, 0),
        "gc_pause_ms": (tot(b, 1) - tot(a, 1)) * 1000,
        "gc2_collections": b["gens"][2][0] - (a["gens"][2][0] if a else 0),
        "gc_max_pause_ms": max(max(g[2] for g in r["gens"]) for r in inside) * 1000,
    }


def soak_once(
    ctx: Context,
    tag: str,
    duration: int,
    window: int,
    check: int,
    spy_s: int,
    db: Path | None = None,
) -> dict[str, Any]:
    """One soak against a fresh server (on `db` when given); its windows."""
    n = RATE * duration
    gc_path = ctx.work_dir / f"{tag}-gc.jsonl"
    gc_path.unlink(missing_ok=True)
    spy_dir = ctx.out_dir / "profiles"
    spy_dir.mkdir(exist_ok=True)
    env = {"BENCH_GC_EVERY": "5", "BENCH_GC_OBJECTS_EVERY": "30" if ctx.quick else "300"}
    launcher = ("-m", "bench.tools.gcserve", str(gc_path))
    spies: list[dict[str, Any]] = []
    with opscore_server(ctx.work_dir, tag=tag, db=db, launcher=launcher, env=env) as srv:
        assert srv.db is not None
        agents = [
            LoadGen(
                "agents",
                {
                    "target": srv.target,
                    "n_agents": k,
                    "id_prefix": f"{tag}-p{j}",
                    "capability": "bench",
                    "shape": "unary",
                    "max_in_flight": 1,
                    "deadline_s": duration + 600,
                    "return_latencies": False,
                    "window_s": window,
                },
                ctx.work_dir / f"{tag}-agents{j}.log",
            )
            for j, k in enumerate(split(AGENTS, 2))
        ]
        with loadgens(agents):
            for a in agents:
                a.wait_ready()
            enq = LoadGen(
                "enqueue",
                {
                    "target": srv.target,
                    "n": n,
                    "mode": "unary",
                    "rate": RATE,
                    "capability": "bench",
                    "deadline_s": duration + 120,
                    "window_s": window,
                },
                ctx.work_dir / f"{tag}-enqueue.log",
            )
            with loadgens([enq]):
                enq.wait_ready()
                sampler = Sampler(srv.pid, srv.db, agents, [enq.pid])
                sampler.start()
                t_go = time.monotonic()
                enq.send("GO")
                # py-spy near the start (after warm-up) and near the end.
                due = [
                    ("start", t_go + min(30.0, duration * 0.1)),
                    ("end", t_go + duration - spy_s - max(10.0, duration * 0.02)),
                ]
                deadline = t_go + duration + 300
                procs = []
                while time.monotonic() < deadline:
                    if sum(a.progress for a in agents) >= n:
                        break
                    if any(a.done() for a in agents) or (enq.done() and enq.result is None):
                        break
                    if spy_s and due and time.monotonic() >= due[0][1] and pyspy.available():
                        label, _ = due.pop(0)
                        out = spy_dir / f"{tag}-{label}.txt"
                        t = time.monotonic()
                        procs.append(
                            (
                                label,
                                out,
                                t,
                                pyspy.record(srv.pid, spy_s, out, native=False, idle=True),
                            )
                        )
                        ctx.say(f"  py-spy ({label}) at {t - t_go:.0f} s for {spy_s} s")
                    time.sleep(0.2)
                for label, out, t, proc in procs:
                    with contextlib.suppress(Exception):
                        proc.wait(timeout=spy_s + 60)
                    spies.append({"label": label, "file": out, "t": t})
                sampler.stop()
                for a in agents:
                    a.send("STOP")
                eres = enq.wait_result(timeout=120)
                ares = [a.wait_result(timeout=300) for a in agents]
    remove_db(srv.db)
    completed = sum(r["completed"] for r in ares)
    if completed < n:
        raise BenchError(f"{tag}: only {completed}/{n} tasks completed")

    gc_log = []
    with contextlib.suppress(OSError):
        gc_log = [json.loads(line) for line in gc_path.read_text().splitlines() if line.strip()]

    # Windows of the monotonic clock fully inside the enqueuer's run.
    lat_by: dict[int, list[float]] = {}
    for r in ares:
        for k, v in r["assign_windows"].items():
            lat_by.setdefault(int(k), []).extend(v)
    calls_by = {int(k): v for k, v in eres["call_windows"].items()}
    behind_by = {int(k): v for k, v in eres["behind_windows"].items()}
    first_k = int(-(-eres["t_start"] // window))
    last_k = int(eres["t_end"] // window) - 1
    samples = sampler.samples
    rows = []
    for k in range(first_k, last_k + 1):
        t0, t1 = k * window, (k + 1) * window
        lat = latency_summary(lat_by.get(k, []))
        a, b = at(samples, t0), at(samples, t1)
        row: dict[str, Any] = {
            "window": k - first_k,
            "minute": (t0 - eres["t_start"]) / 60,
            "tasks": lat.get("count", 0),
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
            "max_ms": lat.get("max_ms"),
            "enqueue_call_p99_ms": latency_summary(calls_by.get(k, [])).get("p99_ms"),
            "enqueuer_behind_ms": behind_by.get(k, 0.0) * 1000,
        }
        if a and b and b["completed"] > a["completed"]:
            done = b["completed"] - a["completed"]
            row |= {
                "server_cpu_us_per_task": (b["server_cpu_s"] - a["server_cpu_s"]) / done * 1e6,
                "loop_thread_us_per_task": (b["main_thread_cpu_s"] - a["main_thread_cpu_s"])
                / done
                * 1e6,
                "other_threads_us_per_task": (b["other_threads_cpu_s"] - a["other_threads_cpu_s"])
                / done
                * 1e6,
                "loadgen_cpu_us_per_task": (b["loadgen_cpu_s"] - a["loadgen_cpu_s"]) / done * 1e6,
                "disk_write_kib_per_task": (b["write_bytes"] - a["write_bytes"]) / done / 1024,
                "wal_frames_per_task": (b["frames_appended"] - a["frames_appended"]) / done,
                "checkpoints": b["checkpoints"] - a["checkpoints"],
                "wal_restarts": b["wal_restarts"] - a["wal_restarts"],
                "db_mib": b["db_bytes"] / 2**20,
                "wal_mib": max(s["wal_bytes"] for s in samples if t0 < s["t"] <= t1) / 2**20,
                "rss_mib": b["rss_mib"],
                "loadavg_1m": b["loadavg_1m"],
            }
        row |= gc_between(gc_log, t0, t1)
        row["py_spy"] = any(t0 < s["t"] + spy_s and s["t"] < t1 for s in spies)
        rows.append(row)
    if len(rows) < 2 * check:
        raise BenchError(f"{tag}: only {len(rows)} full windows, need {2 * check}")

    def p99_of(ks: list[int]) -> float:
        vals = [x for k in ks for x in lat_by.get(k, [])]
        return latency_summary(vals)["p99_ms"]

    first = p99_of(list(range(first_k, first_k + check)))
    last = p99_of(list(range(last_k - check + 1, last_k + 1)))
    # The same comparison over the windows in which the load generator kept to
    # its schedule, so that the machine's other jobs do not decide the check.
    calm = [first_k + r["window"] for r in rows if r["enqueuer_behind_ms"] <= ON_SCHEDULE_MS]
    calm_first = p99_of(calm[:check]) if len(calm) >= 2 * check else None
    calm_last = p99_of(calm[-check:]) if len(calm) >= 2 * check else None
    objects = [(r["t"], r["objects"]) for r in gc_log if "objects" in r]

    profiles = []
    for s in spies:
        if Path(s["file"]).exists():
            summ = pyspy.summarize(Path(s["file"]))
            profiles.append(
                {
                    "label": s["label"],
                    "at_s": s["t"] - eres["t_start"],
                    "file": str(Path(s["file"]).relative_to(ctx.out_dir)),
                    "summary": summ,
                }
            )

    def col(key: str) -> list[float]:
        return [r[key] for r in rows if r.get(key) is not None]

    return {
        "rows": rows,
        "first": first,
        "last": last,
        "calm_first": calm_first,
        "calm_last": calm_last,
        "calm_windows": len(calm),
        "objects": objects,
        "profiles": profiles,
        "completed": completed,
        "metrics": {
            "first_windows_p99_ms": metric([first], "ms", "lower"),
            "last_windows_p99_ms": metric([last], "ms", "lower"),
            "window_p99_ms": metric(col("p99_ms"), "ms (over windows)", "lower"),
            "server_cpu_us_per_task": metric(
                col("server_cpu_us_per_task"), "µs (windows)", "lower"
            ),
            "db_mib_at_end": metric([rows[-1].get("db_mib", 0.0)], "MiB", "lower"),
            "rss_mib": metric(col("rss_mib"), "MiB (windows)", "lower"),
        },
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties broken by position; fine for a report)."""

    def ranks(v: list[float]) -> list[int]:
        out = [0] * len(v)
        for k, i in enumerate(sorted(range(len(v)), key=v.__getitem__)):
            out[i] = k
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def run(ctx: Context) -> dict[str, Any]:
    p = plan(ctx.quick)
    duration, window, check, spy_s = (
        p["duration_s"],
        p["window_s"],
        p["check_windows"],
        p["spy_s"],
    )
    main = soak_once(ctx, "s8", duration, window, check, spy_s)
    first, last = main["first"], main["last"]
    ratio = last / first
    cfgs = [
        {
            "name": f"{AGENTS} agents, {RATE} tasks/s offered, {duration // 60} min, unary shape",
            "params": {"agents": AGENTS, "rate": RATE, **p},
            "metrics": main["metrics"],
            "runs": [{k: main[k] for k in ("objects", "profiles", "completed")}],
        }
    ]
    tables = [
        {"title": f"{duration // 60}-minute soak on a fresh database", "windows": main["rows"]}
    ]
    ratios = [{"name": "p99, last / first windows (check: ≤ 1.2)", "value": ratio}]
    calm_first, calm_last = main["calm_first"], main["calm_last"]
    if calm_first and calm_last:
        ratios.append(
            {
                "name": f"p99, last / first {check} windows in which the enqueuer kept its "
                f"schedule (behind ≤ {ON_SCHEDULE_MS:.0f} ms; {main['calm_windows']} of "
                f"{len(main['rows'])} windows)",
                "value": calm_last / calm_first,
            }
        )
    # What the window p99 moves with (rank correlation, -1..1): a drift that
    # follows the database's size or the server's age, or one that follows the
    # machine's load and the load generator's own lateness.
    p99s = [r["p99_ms"] for r in main["rows"]]
    for key, what in (
        ("minute", "time"),
        ("db_mib", "database size"),
        ("loadavg_1m", "machine load average"),
        ("enqueuer_behind_ms", "how late the enqueuer started its calls"),
        ("gc_max_pause_ms", "longest GC pause"),
        ("server_cpu_us_per_task", "server CPU per task"),
    ):
        vals = [r.get(key) for r in main["rows"]]
        if all(v is not None for v in vals):
            ratios.append(
                {
                    "name": f"rank correlation of window p99 with {what}",
                    "value": spearman(p99s, [float(v) for v in vals]),
                }
            )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": cfgs,
        "ratios": ratios,
        "targets": [
            {
                "target": f"soak: p99 of the last {check} windows ≤ {MAX_DRIFT}x the first "
                f"{check} ({duration // 60} min at {RATE} tasks/s, {AGENTS} agents)",
                "measured": f"{last:.2f} ms vs {first:.2f} ms: ratio {ratio:.2f}",
                "met": ratio <= MAX_DRIFT,
            },
            *(
                [
                    {
                        "target": f"soak, the same over the windows in which the load "
                        f"generator kept its schedule ({main['calm_windows']} of "
                        f"{len(main['rows'])})",
                        "measured": f"{calm_last:.2f} ms vs {calm_first:.2f} ms: ratio "
                        f"{calm_last / calm_first:.2f}",
                        "met": calm_last / calm_first <= MAX_DRIFT,
                    }
                ]
                if calm_first and calm_last
                else []
            ),
        ],
        "window_tables": tables,
        "notes": [
            f"Windows of {window} s of enqueue time; the first and last {check} are compared. "
            "Per window: latency percentiles of the tasks enqueued in it; server and load "
            "generator CPU, disk writes and WAL frames per task completed in it; the sizes "
            "at its end; GC collections and pauses in it (bench.tools.gcserve); "
            "py_spy marks the windows in which py-spy sampled the server.",
            "WAL counters come from the -shm header read 20 times a second: wal_restarts "
            "counts the times the WAL started again from its beginning after a checkpoint "
            "(a lower bound).",
            "Scenario 9b (soak_history) runs the same load on a database that already holds "
            "the history this soak leaves behind.",
        ],
    }
