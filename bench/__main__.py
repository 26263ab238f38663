"""`python -m bench` (or `make bench [QUICK=1]`): run the benchmark scenarios,
write bench/results/<timestamp>/ (one JSON per scenario, report.md, PNG plots)
and print the report. See docs/benchmarks.md."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench.common import (
    REPO_ROOT,
    Context,
    Unavailable,
    git_commit,
    machine_info,
    now_stamp,
    write_result,
)
from bench.scenarios import ALL, BY_NAME


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small N, 1 repeat")
    p.add_argument(
        "--scenarios",
        default=",".join(m.NAME for m in ALL),
        help="comma-separated subset of: " + ", ".join(m.NAME for m in ALL),
    )
    p.add_argument("--repeats", type=int, help="repeats per figure (default 3; quick 1)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<UTC time>)")
    p.add_argument("--keep-work", action="store_true", help="keep server/load generator logs")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in BY_NAME]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out or REPO_ROOT / "bench" / "results" / now_stamp()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    ctx = Context(
        out_dir=out,
        work_dir=work,
        quick=args.quick,
        repeats=repeats,
        command=command.strip(),
        git=git_commit(),
        machine=machine_info(),
        log=lambda m: print(m, flush=True),
    )
    t_all = time.monotonic()
    print(f"bench: results in {out}", flush=True)
    failed = []
    for name in names:
        mod = BY_NAME[name]
        t0 = time.monotonic()
        print(f"[{name}] {mod.TITLE}", flush=True)
        try:
            body = mod.run(ctx)
        except Unavailable as e:
            body = {"title": mod.TITLE, "status": f"not available in this build: {e}"}
        except Exception as e:  # one scenario failing must not stop the others
            traceback.print_exc()
            failed.append(name)
            body = {"title": mod.TITLE, "status": f"error: {type(e).__name__}: {e}"}
        body["seconds"] = time.monotonic() - t0
        write_result(ctx, name, body)
        print(f"[{name}] {body.get('status', 'ok')} in {body['seconds']:.0f} s", flush=True)
    path = report.write(out)
    total = time.monotonic() - t_all
    with path.open("a") as f:
        f.write(f"\nTotal run time: {total / 60:.1f} min.\n")
    if failed and not args.keep_work:
        # Keep the logs of a failed run (they say why), not its database files.
        for f in work.glob("*.db*"):
            f.unlink(missing_ok=True)
        print(f"bench: logs kept in {work}", flush=True)
    elif not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(path.read_text())
    print(f"bench: {out} ({total / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
