"""Durability across a crash (DESIGN §5): the real server as a subprocess, killed
with SIGKILL and restarted on the same database file and port."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb

from tests.conftest import eventually
from tests.support.ledger import (
    TS,
    Ledger,
    agent_loop,
    as_dict,
    assignment,
    connect,
    dur,
    kill,
    no_open,
    now,
    struct,
    when,
)
from tests.support.procserver import free_port, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FAST_RETRY = common_pb2.RetryPolicy(
    max_attempts=10, initial_backoff=duration_pb2.Duration(nanos=200_000_000)
)


# ------------------------------------------------------------------ a. busy queue


async def test_kill_during_enqueue_and_complete_loses_nothing(tmp_path: Path):
    port = free_port()
    args = ("--agent-timeout", "1")
    ledger = Ledger()
    target_acks = 300

    with running_server(tmp_path, *args, port=port) as server:
        async with connect(server) as client:
            await client.register("w1", ["work"])
            reached = asyncio.Event()
            in_flight = 0

            async def enqueuer() -> None:
                nonlocal in_flight
                n = 0
                while True:
                    n += 1
                    in_flight += 1
                    resp = await client.dispatch.EnqueueTask(
                        pb.EnqueueTaskRequest(
                            capability="work",
                            name=f"job-{n}",
                            input=struct(n=n),
                            timeout=dur(2),
                            retry_policy=FAST_RETRY,
                        )
                    )
                    in_flight -= 1
                    ledger.enqueued.append(resp.task.task_id)
                    if len(ledger.enqueued) >= target_acks:
                        reached.set()

            reader = await client.subscribe("w1", max_in_flight=8)
            loops = [
                asyncio.create_task(enqueuer()),
                asyncio.create_task(agent_loop(client, ledger, "w1", reader, hold=4)),
            ]
            await asyncio.wait_for(reached.wait(), 90)
            # Crash while the enqueuer has a call out and completions are on the wire.
            assert in_flight == 1
            await kill(server)
            results = await asyncio.gather(*loops, return_exceptions=True)
            # Each loop ended because its connection broke, not because of a bug.
            for r in results:
                assert isinstance(r, grpc.aio.AioRpcError), repr(r)
                assert r.code() == grpc.StatusCode.UNAVAILABLE, r
            assert {code for *_, code in ledger.errors} <= {grpc.StatusCode.UNAVAILABLE}
            ledger.errors.clear()

    assert len(ledger.enqueued) >= target_acks
    acked_completions = {t: v[0] for t, v in ledger.completed.items()}
    assert acked_completions, "nothing was completed before the crash"

    with running_server(tmp_path, *args, port=port, db_path=server.db_path) as server:
        async with connect(server) as client:
            # Every acknowledged enqueue survived; so did every task ever assigned
            # (an assignment is sent only after its task is committed).
            ids = sorted(set(ledger.enqueued) | set(ledger.assigned))
            tasks = dict(zip(ids, await asyncio.gather(*(client.get(i) for i in ids)), strict=True))
            # Every acknowledged completion survived, with its attempt and output.
            for task_id, (attempt, output) in acked_completions.items():
                t = tasks[task_id]
                assert t.state == TS.TASK_STATE_COMPLETED, (task_id, TS.Name(t.state))
                assert t.attempt == attempt and as_dict(t.output) == output, t

            # Repeating an acknowledged completion (a client retrying after the
            # crash) returns the task unchanged.
            async def repeat(task_id: str, attempt: int, output: dict[str, Any]) -> None:
                resp = await client.dispatch.CompleteTask(
                    pb.CompleteTaskRequest(
                        task_id=task_id, agent_id="w1", attempt=attempt, output=struct(**output)
                    )
                )
                assert resp.task == tasks[task_id]

            await asyncio.gather(*(repeat(t, *v) for t, v in acked_completions.items()))

            # Completions sent but not acknowledged before the crash: the retry either
            # succeeds (lease still held) or is refused because the lease is gone.
            unacked = {t: v for t, v in ledger.sent.items() if t not in ledger.completed}
            for task_id, (attempt, output) in unacked.items():
                req = pb.CompleteTaskRequest(
                    task_id=task_id, agent_id="w1", attempt=attempt, output=struct(**output)
                )
                try:
                    resp = await client.dispatch.CompleteTask(req)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                    continue
                assert resp.task.state == TS.TASK_STATE_COMPLETED
                assert (resp.task.attempt, as_dict(resp.task.output)) == (attempt, output)
                ledger.completed.setdefault(task_id, []).append((attempt, output))

            # Tasks the agent was still working on at the crash (no result sent).
            held = {
                i
                for i, t in tasks.items()
                if t.state == TS.TASK_STATE_ASSIGNED and i not in ledger.sent
            }
            # The four in the agent's hands, and any whose assignment was on the wire.
            assert len(held) >= 4, {i: TS.Name(t.state) for i, t in tasks.items()}
            received_before = {i: len(ledger.assigned.get(i, ())) for i in held}

            # Resubscribe and finish the rest. Tasks ASSIGNED at the crash come back:
            # sent again on reconnect, or retried once their 2 s leases (or the
            # agent's 1 s liveness) pass.
            reader = await client.subscribe("w1", max_in_flight=8)
            loop = asyncio.create_task(agent_loop(client, ledger, "w1", reader))
            try:
                await eventually(
                    lambda: no_open(client, loop),
                    timeout=60,
                    interval=0.2,
                    what="every task finished",
                )
            finally:
                await reader.close()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    await loop
            assert not ledger.errors, f"completions refused after restart: {ledger.errors[:10]}"

            final = await client.all_tasks()

    assert not ledger.reassigned_after_completion, (
        f"tasks dispatched again after an acknowledged completion: "
        f"{ledger.reassigned_after_completion[:10]}"
    )
    by_id = {t.task_id: t for t in final}
    assert len(by_id) == len(final)
    assert set(ledger.enqueued) <= set(by_id)
    not_done = {i: TS.Name(t.state) for i, t in by_id.items() if t.state != TS.TASK_STATE_COMPLETED}
    assert not not_done, f"{len(not_done)} tasks not COMPLETED: {list(not_done.items())[:10]}"
    # Each task was completed exactly once, and the stored result is that one.
    twice = {t: v for t, v in ledger.completed.items() if len(v) != 1}
    assert not twice, f"completed more than once: {list(twice.items())[:10]}"
    assert set(ledger.completed) == set(by_id)
    for task_id, [(attempt, output)] in ledger.completed.items():
        t = by_id[task_id]
        assert (t.attempt, as_dict(t.output)) == (attempt, output), t
    # The tasks held at the crash came back to the reconnected agent (sent again with
    # their kept lease, or retried once it passed) and were completed once.
    for i in held:
        assert len(ledger.assigned[i]) == received_before[i] + 1, (i, ledger.assigned[i])
        assert by_id[i].attempt in (1, 2)


# ------------------------------------------------------------------ b. schedules


async def test_scheduled_task_fires_on_time_after_a_crash(tmp_path: Path):
    port = free_port()
    with running_server(tmp_path, port=port) as server:
        async with connect(server) as client:
            await client.register("w1", ["later"])
            resp = await client.dispatch.EnqueueTask(
                pb.EnqueueTaskRequest(capability="later", delay=dur(3))
            )
            task = resp.task
            await kill(server)
    assert task.state == TS.TASK_STATE_SCHEDULED
    due = when(task.schedule_time)

    with running_server(tmp_path, port=port, db_path=server.db_path) as server:
        async with connect(server) as client:
            stored = await client.get(task.task_id)
            reader = await client.subscribe("w1")
            subscribed = now()
            # The restart was quick enough that the timer itself has to fire.
            assert subscribed < due, "restart took longer than the delay; test proves nothing"
            assert stored.state == TS.TASK_STATE_SCHEDULED, stored
            assert when(stored.schedule_time) == due
            got = await assignment(reader)
            arrived = now()
            await reader.close()
    assert got.task_id == task.task_id and got.attempt == 1
    assert arrived >= due, f"assigned {(due - arrived).total_seconds():.3f}s early"
    assert arrived <= due + timedelta(seconds=2), (
        f"assigned {(arrived - due).total_seconds():.3f}s after it was due"
    )


# ------------------------------------------------------------------ c. leases


async def test_lease_deadline_survives_a_crash(tmp_path: Path):
    port = free_port()
    with running_server(tmp_path, port=port) as server:
        async with connect(server) as client:
            await client.register("w1", ["job"])
            await client.register("w2", ["job"])
            reader = await client.subscribe("w1")
            enqueued = await client.dispatch.EnqueueTask(
                pb.EnqueueTaskRequest(capability="job", timeout=dur(3), retry_policy=FAST_RETRY)
            )
            first = await assignment(reader)
            assert first.task_id == enqueued.task.task_id and first.attempt == 1
            await kill(server)
            await reader.close()
    lease = when(first.lease_expire_time)

    with running_server(tmp_path, port=port, db_path=server.db_path) as server:
        async with connect(server) as client:
            stored = await client.get(first.task_id)
            assert now() < lease, "restart took longer than the lease; test proves nothing"
            # The lease survived as it was: same holder, attempt and deadline.
            assert stored.state == TS.TASK_STATE_ASSIGNED, stored
            assert stored.attempt == 1 and stored.assigned_agent_id == "w1"
            assert when(stored.lease_expire_time) == lease, stored
            reader = await client.subscribe("w2")
            second = await assignment(reader)
            arrived = now()
            assert second.task_id == first.task_id
            assert second.attempt == 2
            assert arrived >= lease, f"retried {(lease - arrived).total_seconds():.3f}s early"
            assert arrived <= lease + timedelta(seconds=3), (
                f"retried {(arrived - lease).total_seconds():.3f}s after the lease passed"
            )
            # The crashed attempt's late result is fenced off; the new one counts.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.dispatch.CompleteTask(
                    pb.CompleteTaskRequest(task_id=first.task_id, agent_id="w1", attempt=1)
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            done = await client.dispatch.CompleteTask(
                pb.CompleteTaskRequest(
                    task_id=first.task_id, agent_id="w2", attempt=2, output=struct(ok=True)
                )
            )
            assert done.task.state == TS.TASK_STATE_COMPLETED
            await reader.close()
