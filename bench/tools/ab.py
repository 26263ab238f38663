"""A/B of two or more server code trees under the same work-stream load, run in
alternating order (A B, B A, ...) so that the machine's drift falls on both.

    python -m bench.tools.ab PAIRS TREE [TREE ...] [--mif N] [--agents N] [--tasks N]
    # a tree: a directory holding `opscore/` and `generated/`, e.g.
    git worktree add /tmp/base HEAD~1 && python -m bench.tools.ab 4 /tmp/base .

Each server runs `python -m opscore serve` from the repo root with the tree first
on PYTHONPATH. PYTHONSAFEPATH is what makes that true: without it, `-m` puts the
working directory (this repo) first on sys.path, and every tree runs this repo's
code. Before measuring, the tool checks, with the same environment, that each
tree's `opscore` is the one imported, and refuses to run otherwise.

Prints tasks/s and server CPU per task for every run and, per tree, the sorted
values: read the pairs, not one run.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from bench.common import PY, REPO_ROOT, BenchError, _bench_env, opscore_server, remove_db
from bench.dispatch_run import run_dispatch


def tree_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{tree}:{tree / 'generated'}", "PYTHONSAFEPATH": "1"}


def check_tree(tree: Path) -> None:
    """The server started with tree_env(tree) imports this tree's code."""
    probe = "import opscore, opscore_proto; print(opscore.__file__); print(opscore_proto.__file__)"
    out = subprocess.run(
        [PY, "-c", probe],
        cwd=REPO_ROOT,
        env={**_bench_env(), **tree_env(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(tree):
            raise BenchError(f"tree {tree}: imports {path}, not the tree's own code")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", type=int, help="rounds; each runs every tree once")
    ap.add_argument("trees", nargs="+", type=Path)
    ap.add_argument("--mif", type=int, default=1, help="max_in_flight per agent (1)")
    ap.add_argument("--agents", type=int, default=16, help="agents (16)")
    ap.add_argument("--tasks", type=int, default=20000, help="tasks per run (20,000)")
    a = ap.parse_args()
    trees = [t.resolve() for t in a.trees]
    for tree in trees:
        check_tree(tree)
    work = Path(tempfile.mkdtemp(prefix="opscore-ab-"))
    results: dict[Path, list[tuple[float, float]]] = {t: [] for t in trees}
    for i in range(a.pairs):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            tag = f"ab{i}"
            with opscore_server(work, tag=tag, env=tree_env(tree)) as srv:
                r = run_dispatch(
                    target=srv.target,
                    server_pid=srv.pid,
                    work_dir=work,
                    tag=tag,
                    n_agents=a.agents,
                    n_tasks=a.tasks,
                    mode="batch",
                    shape="stream",
                    max_in_flight=a.mif,
                    batch_size=100,
                )
            remove_db(srv.db)
            results[tree].append((r["tasks_per_s"], r["server_cpu_us_per_task"]))
            print(
                f"{tree}: {r['tasks_per_s']:,.0f} tasks/s, "
                f"{r['server_cpu_us_per_task']:.0f} µs/task",
                flush=True,
            )
    for tree, runs in results.items():
        rates = sorted(round(x[0]) for x in runs)
        cpu = sorted(round(x[1]) for x in runs)
        print(f"{tree}: tasks/s {rates}, server µs/task {cpu}")


if __name__ == "__main__":
    main()
