"""`python -m bench.tools.gcserve LOGFILE serve ARGS...`: run `opscore` exactly as
`python -m opscore serve ARGS...`, and record the pauses of Python's garbage
collector (the soak scenario's evidence; nothing in opscore/ changes).

Every `--gc-every` seconds (env BENCH_GC_EVERY, default 5) one JSON line is
appended to LOGFILE: the monotonic time, and per generation the collections so
far, their total pause in seconds and the longest pause since the previous line.
With BENCH_GC_OBJECTS_EVERY=S it also counts the objects the collector tracks
every S seconds (gc.get_objects(): takes tens of ms, so rarely): a count that
grows with the finished tasks would be something kept per task.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import threading
import time

# generation -> [collections, total pause s, longest pause s since the last line]
_stats = [[0, 0.0, 0.0] for _ in range(3)]
_started = [0.0]


def _callback(phase: str, info: dict[str, int]) -> None:
    # Collections run with the GIL held, one at a time: one start slot suffices.
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _started[0]
    s = _stats[info["generation"]]
    s[0] += 1
    s[1] += pause
    s[2] = max(s[2], pause)


def _reporter(path: str, every: float, objects_every: float) -> None:
    last_objects = time.monotonic()
    with open(path, "a") as f:
        while True:
            time.sleep(every)
            rec: dict[str, object] = {"t": time.monotonic(), "gens": [list(s) for s in _stats]}
            for s in _stats:
                s[2] = 0.0
            if objects_every and time.monotonic() - last_objects >= objects_every:
                t = time.perf_counter()
                rec["objects"] = len(gc.get_objects())
                rec["objects_count_s"] = time.perf_counter() - t
                last_objects = time.monotonic()
            f.write(json.dumps(rec) + "\n")
            f.flush()


def main() -> None:
    path = sys.argv[1]
    every = float(os.environ.get("BENCH_GC_EVERY", "5"))
    objects_every = float(os.environ.get("BENCH_GC_OBJECTS_EVERY", "0"))
    gc.callbacks.append(_callback)
    threading.Thread(
        target=_reporter, args=(path, every, objects_every), name="bench-gc", daemon=True
    ).start()
    sys.argv = ["opscore", *sys.argv[2:]]
    runpy.run_module("opscore", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
