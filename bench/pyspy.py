"""py-spy on the server under test: record raw (collapsed) stacks, and sum them
up by who spends the time, so a profile reads as a table in the report.

    python -m bench.pyspy FILE.txt      # summarize a recorded raw profile

Every sample is charged to one group: the first frame, scanning from the leaf
towards the root, that belongs to a known group (so time inside libsqlite3
called from the writer thread is storage, a protobuf encode called from our
converter is protobuf, and CPython's own frames are charged to whoever called
them). Idle threads are not sampled (py-spy's default), so the shares are of
busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

# (group, substrings of a frame's "name (file:line)" text), matched in order.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("gc", ("gcmodule.c", "gc_collect")),
    ("logging", ("(logging/", "(opscore/logs.py", "(json/")),
    ("protobuf", ("google/protobuf", "_message.", "upb")),
    ("grpc", ("(grpc/", "cygrpc", "grpc_core", "libgrpc", "(grpc_")),
    (
        "storage (sqlite, aiosqlite, store.py)",
        (
            "(opscore/storage/",
            "(aiosqlite/",
            "(sqlite3/",
            "libsqlite3",
            "_sqlite3",
            "(cursor.c",
            "(connection.c",
            "(statement.c",
            "(microprotocols.c",
            "(row.c",
        ),
    ),
    ("ours: api (servicers, convert, interceptors)", ("(opscore/api/",)),
    ("ours: engine (dispatch, workstream, lifecycle, ...)", ("(opscore/",)),
    (
        "asyncio / event loop (uvloop)",
        (
            "(asyncio/",
            "(loop.c",
            "_asynciomodule",
            "uvloop",
            "(selectors",
            "(core.c",
            "(linux.c",
            "(loop-watcher.c",
            "(socketmodule.c",
            "(queue.h",
        ),
    ),
]
OTHER = "other (CPython runtime, libc, threads)"
# With --native (and with --idle), py-spy also samples threads that wait. A
# sample is a wait, not work, when its stack shows one of these; the groups above
# are shares of the work samples only.
IDLE = "idle (waiting for work: event loop poll, queue get)"
LOCK = "waiting for the GIL or a lock"
DISK = "waiting on the disk (fsync)"
IDLE_MARKS = ("epoll_wait", "epoll_pwait", "_queue_SimpleQueue_get", "(selectors")
LOCK_MARKS = ("take_gil", "pthread_cond_timedwait", "pthread_cond_wait", "PyThread_acquire_lock")
DISK_MARKS = ("fdatasync", "fsync (")
FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def available() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


def record(
    pid: int, seconds: float, out: Path, *, native: bool, rate: int = 100, idle: bool = False
) -> Any:
    """Start recording `pid` for `seconds` (raw format) and return the process.
    native: also unwind C/Cython frames (pauses the process per sample);
    otherwise --nonblocking, which leaves the server's timing alone. idle: also
    sample threads that wait (to see where a thread's wall time goes)."""
    exe = available()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
    cmd = [exe, "record", "--pid", str(pid), "-d", str(max(1, int(seconds))), "-r", str(rate)]
    cmd += ["-f", "raw", "-t", "-o", str(out)]
    cmd += ["--native"] if native else ["--nonblocking"]
    cmd += ["--idle"] if idle else []
    log = open(out.with_suffix(".log"), "wb")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=log)


def group_of(frame: str) -> str | None:
    for name, needles in GROUPS:
        if any(n in frame for n in needles):
            return name
    return None


def thread_kind(first: str) -> str:
    if "MainThread" in first:
        return "event loop (MainThread)"
    if "_connection_worker_thread" in first:
        return "SQLite threads (aiosqlite)"
    if "_poll_wrapper" in first:
        return "grpc poller"
    return "other threads"


def _entry(name: str, file: str) -> bool:
    """The frames under every sample of the main thread (start-up call chain)."""
    return (
        file in ("opscore/__main__.py", "opscore/server.py") and name in ("<module>", "run")
    ) or (file.startswith("opscore/cli/"))


def state_of(frames: list[str]) -> str | None:
    """IDLE, LOCK or DISK for a waiting sample, None for work."""
    if any(m in f for f in frames for m in IDLE_MARKS):
        return IDLE
    near_leaf = frames[-3:]
    if any(m in f for f in near_leaf for m in DISK_MARKS):
        return DISK
    if any(m in f for f in near_leaf for m in LOCK_MARKS):
        return LOCK
    return None


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    states: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    main_groups: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaf_py: Counter[str] = Counter()
    ours_incl: Counter[str] = Counter()
    # Per kind of thread: the deepest Python frame with its line (where a thread's
    # time goes, e.g. the writer's executemany against its COMMIT).
    lines_by_thread: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        kind = thread_kind(frames[0])
        frames = frames[1:]
        total += n
        state = state_of(frames)
        states[f"{kind}: {state or 'working'}"] += n
        if state is not None:
            continue
        threads[kind] += n
        g = next((x for x in map(group_of, reversed(frames)) if x), OTHER)
        groups[g] += n
        if kind.startswith("event loop"):
            main_groups[g] += n
        py = [f for f in frames if ".py:" in f]
        if py:
            m = FRAME.match(py[-1])
            leaf_py[f"{m['name']} ({m['file']})" if m else py[-1]] += n
            lines_by_thread.setdefault(kind, Counter())[py[-1]] += n
        seen = set()
        for f in frames:
            m = FRAME.match(f)
            if m and m["file"].startswith("opscore/") and not _entry(m["name"], m["file"]):
                key = f"{m['name']} ({m['file']})"
                if key not in seen:
                    seen.add(key)
                    ours_incl[key] += n

    def share(c: Counter[str], of: int) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "share": v / max(1, of)} for k, v in c.most_common()]

    main_total = sum(main_groups.values())
    work = sum(threads.values())
    return {
        "samples": total,
        "work_samples": work,
        "states": share(states, total),
        "threads": share(threads, work),
        "groups": share(groups, work),
        "event_loop_groups": share(main_groups, main_total),
        "top_python_leaves": share(leaf_py, work)[:top],
        "top_ours_inclusive": share(ours_incl, work)[:top],
        "lines_by_thread": {
            k: share(c, threads[k])[:8] for k, c in sorted(lines_by_thread.items())
        },
    }


def render(summary: dict[str, Any], title: str) -> str:
    work = summary.get("work_samples", summary["samples"])
    lines = [f"{title}: {summary['samples']:,} samples, {work:,} of them working", ""]
    for key, head in (
        ("states", "thread: state (share of all samples)"),
        ("threads", "working samples by thread"),
        ("groups", "working samples by group, all threads (self time)"),
        ("event_loop_groups", "working samples by group, event loop thread only"),
        ("top_python_leaves", "deepest Python function of working samples"),
        ("top_ours_inclusive", "Ops-Core functions (inclusive, working samples)"),
    ):
        lines.append(f"| {head} | share |")
        lines.append("|---|---:|")
        for row in summary.get(key, []):
            lines.append(f"| {row['name']} | {row['share']:.1%} |")
        lines.append("")
    for kind, rows in summary.get("lines_by_thread", {}).items():
        lines.append(f"| {kind}: deepest Python line | share of the thread |")
        lines.append("|---|---:|")
        for row in rows:
            lines.append(f"| {row['name']} | {row['share']:.1%} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1])), sys.argv[1]))
