"""`make chaos [N=100]` (python -m bench.chaos --kills N): SIGKILL the real server
N times at random moments while a steady load of enqueues, completions and
retryable failures runs against it, restarting it each time on the same file;
then finish the work and verify what the server promised.

Verified at the end: every acknowledged enqueue exists; every acknowledged
completion is stored, with its attempt and output, and no task was completed
twice (completions acknowledged per task are counted) nor dispatched again after
one; no attempt acknowledged as failed was also completed; every task finished;
`PRAGMA integrity_check` says ok. Prints a summary; exits 1 on any problem.

The accounting is tests/support/ledger.py, shared with tests/test_crash.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb

from tests.conftest import eventually
from tests.support.hostile import integrity
from tests.support.ledger import TS, Client, Ledger, agent_loop, connect, dur, kill, no_open, struct
from tests.support.procserver import free_port, running_server

AGENT = "chaos-agent"
CAPABILITY = "chaos"
SERVER_ARGS = ("--agent-timeout", "1")
# Many attempts: a task held at a kill may lose its lease each time.
RETRY = common_pb2.RetryPolicy(max_attempts=100, initial_backoff=dur(0.2), max_backoff=dur(1))
# Results that a kill or a lost lease explain; anything else is a finding.
EXPECTED_REFUSALS = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass
class Summary:
    kills: int = 0
    tasks: int = 0
    completions: int = 0
    failures: int = 0
    duration_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "OK" if not self.problems else f"{len(self.problems)} PROBLEMS"
        lines = [
            f"chaos: {verdict}: {self.kills} kills, {self.tasks} tasks acknowledged, "
            f"{self.completions} completions, {self.failures} retryable failures acknowledged, "
            f"{self.duration_s:.1f} s"
        ]
        lines += [f"  - {p}" for p in self.problems[:20]]
        return "\n".join(lines)


def fails_first_attempt(task: pb.Task) -> bool:
    """A quarter of the tasks fail their first attempt (retryably).

    The choice reads the id's last digits: its first ones are a timestamp
    (time-ordered ids), the same for every task of a few seconds."""
    return task.attempt == 1 and int(task.task_id[-8:], 16) % 4 == 0


async def _enqueue_forever(client: Client, ledger: Ledger) -> None:
    n = len(ledger.enqueued)
    while True:
        n += 1
        resp = await client.dispatch.EnqueueTask(
            pb.EnqueueTaskRequest(
                capability=CAPABILITY,
                name=f"chaos-{n}",
                input=struct(n=n),
                timeout=dur(2),
                retry_policy=RETRY,
            )
        )
        ledger.enqueued.append(resp.task.task_id)


def _unexpected(results: list[object], problems: list[str], what: str) -> None:
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError) and r.code() in EXPECTED_REFUSALS:
            continue
        if r is None or isinstance(r, asyncio.CancelledError):
            continue
        problems.append(f"{what}: load loop ended with {r!r}")


async def run(
    kills: int,
    workdir: Path,
    *,
    seed: int = 0,
    life: tuple[float, float] = (0.3, 1.5),
    log: Callable[[str], None] = print,
) -> Summary:
    """Kill the server `kills` times under load, then verify. Logs go to `workdir`."""
    rng = random.Random(seed)
    ledger = Ledger()
    summary = Summary()
    port = free_port()
    db = workdir / "chaos.db"
    started = time.monotonic()

    for generation in range(kills):
        with running_server(workdir, *SERVER_ARGS, port=port, db_path=db) as server:
            async with connect(server) as client:
                if generation == 0:
                    await client.register(AGENT, [CAPABILITY])
                reader = await client.subscribe(AGENT, max_in_flight=8)
                loops = [
                    asyncio.create_task(_enqueue_forever(client, ledger)),
                    asyncio.create_task(
                        agent_loop(
                            client, ledger, AGENT, reader, rng.randint(0, 3), fails_first_attempt
                        )
                    ),
                ]
                # The random moment of the crash is the point of the exercise.
                await asyncio.sleep(rng.uniform(*life))
                await kill(server)
                results = await asyncio.gather(*loops, return_exceptions=True)
                _unexpected(results, summary.problems, f"kill {generation + 1}")
                await reader.close()
        summary.kills += 1
        if (generation + 1) % 10 == 0 or generation + 1 == kills:
            log(
                f"  {generation + 1}/{kills} kills, {len(ledger.enqueued)} tasks, "
                f"{len(ledger.completed)} completed"
            )

    # Finish the work on a server left alone, then check it against the ledger.
    with running_server(workdir, *SERVER_ARGS, port=port, db_path=db) as server:
        async with connect(server) as client:
            reader = await client.subscribe(AGENT, max_in_flight=8)
            loop = asyncio.create_task(agent_loop(client, ledger, AGENT, reader))
            try:
                await eventually(
                    lambda: no_open(client, loop), timeout=120, interval=0.2, what="all done"
                )
            except AssertionError as exc:
                summary.problems.append(str(exc))
            finally:
                await reader.close()
                with contextlib.suppress(BaseException):
                    await loop
            final = {t.task_id: t for t in await client.all_tasks()}
        code = server.terminate()
        if code != 0:
            summary.problems.append(f"final server exited {code}:\n{server.log_tail()}")

    summary.problems += ledger.problems(final)
    unfinished = [i for i, t in final.items() if t.state != TS.TASK_STATE_COMPLETED]
    if unfinished:
        summary.problems.append(f"{len(unfinished)} tasks not COMPLETED: {unfinished[:5]}")
    refused = [e for e in ledger.errors if e[2] not in EXPECTED_REFUSALS]
    if refused:
        summary.problems.append(f"results refused unexpectedly: {refused[:5]}")
    check = integrity(db)
    if check != "ok":
        summary.problems.append(f"integrity_check: {check}")
    summary.tasks = len(ledger.enqueued)
    summary.completions = sum(len(v) for v in ledger.completed.values())
    summary.failures = sum(len(v) for v in ledger.failed.values())
    summary.duration_s = time.monotonic() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    p.add_argument("--kills", type=int, default=100, help="SIGKILLs (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the kill moments")
    p.add_argument("--workdir", type=Path, help="keep the db and server logs here")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"chaos: {args.kills} kills, seed {args.seed}, work in {workdir}")
        summary = asyncio.run(run(args.kills, workdir, seed=args.seed))
        print(summary)
        return 0 if not summary.problems else 1


if __name__ == "__main__":
    sys.exit(main())
