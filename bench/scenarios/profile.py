"""Scenario 12: where the server's time goes under work-stream load.

16 agents on the work stream, batched EnqueueTasks, max_in_flight 1 and 4; once
the run is under way, py-spy records the server for 15 s (quick: 5 s) with
native frames (grpc's Cython and C core, protobuf's upb, libsqlite3 are then
visible), raw stacks kept in profiles/ of the results. Each sample is charged
to a group (bench/pyspy.py): grpc, protobuf, our engine, our api layer,
storage, logging, asyncio/uvloop, gc, other. Native sampling pauses the server
for every sample, so the run's tasks/s is lower than scenario 1's: the shares
are what this scenario reports, not the speed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bench import pyspy
from bench.common import Context, Unavailable, opscore_server, remove_db
from bench.dispatch_run import run_dispatch

NAME = "profile"
TITLE = "12. Profile of the server, work stream, 16 agents"


def run(ctx: Context) -> dict[str, Any]:
    if pyspy.available() is None:
        raise Unavailable("py-spy is not installed (pip install -e '.[bench]')")
    seconds = 5 if ctx.quick else 15
    spy_dir = ctx.out_dir / "profiles"
    spy_dir.mkdir(exist_ok=True)
    profiles = []
    for mif in (1, 4):
        # Enough tasks that the run outlasts the recording at the speed measured
        # under native sampling.
        n = (2500 if mif == 1 else 3500) * (seconds + 10)
        out = spy_dir / f"profile-stream-mif{mif}.txt"
        tag = f"s11-mif{mif}"
        with opscore_server(ctx.work_dir, tag=tag) as srv:

            def spy(pid: int = srv.pid, out: Path = out) -> None:
                time.sleep(3.0)  # past the agents' start and the first batches
                proc = pyspy.record(pid, seconds, out, native=True)
                proc.wait(timeout=seconds + 60)

            t = threading.Thread(target=spy, daemon=True)
            t.start()
            r = run_dispatch(
                target=srv.target,
                server_pid=srv.pid,
                work_dir=ctx.work_dir,
                tag=tag,
                n_agents=16,
                n_tasks=n,
                mode="batch",
                shape="stream",
                max_in_flight=mif,
            )
            t.join(timeout=seconds + 70)
        remove_db(srv.db)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote no profile ({out.with_suffix('.log')})")
        summary = pyspy.summarize(out)
        ctx.say(
            f"  max_in_flight {mif}: {r['tasks_per_s']:.0f} tasks/s under py-spy; "
            + ", ".join(
                f"{g['name'].split(' ')[0]} {g['share']:.0%}" for g in summary["groups"][:5]
            )
        )
        profiles.append(
            {
                "max_in_flight": mif,
                "file": str(out.relative_to(ctx.out_dir)),
                "tasks_per_s_under_pyspy": r["tasks_per_s"],
                "server_cpu_us_per_task": r["server_cpu_us_per_task"],
                "summary": summary,
            }
        )
    return {
        "title": TITLE,
        "status": "ok",
        "configs": [],
        "ratios": [],
        "profiles": profiles,
        "notes": [
            "Shares are of the samples of busy threads (py-spy leaves idle threads out), "
            "all threads together and the event loop thread alone. A sample is charged to "
            "the first frame from the leaf that belongs to a group, so CPython's own frames "
            "go to whoever called them. The SQLite writer thread's share includes the time "
            "it spends in fsync (py-spy counts a thread in a blocking write as busy), so it "
            "is wall time, not all CPU.",
        ],
    }
