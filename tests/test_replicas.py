"""Several server processes on one PostgreSQL database (issue 11): one queue,
every rule of dispatch across replicas, timers of a killed replica, failover of
its agents, and a database restart under load."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore.agent import Agent, TaskContext
from opscore.client import OpsCoreClient, RetryConfig
from opscore.client.errors import UnavailableError
from tests.conftest import StreamReader, eventually
from tests.support.ledger import (
    TS,
    Ledger,
    agent_loop,
    as_dict,
    assignment,
    connect,
    dur,
    kill,
    struct,
)
from tests.support.pg import PgCluster
from tests.support.procserver import ServerProcess
from tests.support.replicas import start_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Short liveness periods, so that a dead replica's agents and timers are
# recovered in seconds: replica_timeout is a database URL setting.
FAST = ("--agent-timeout", "2")


def fast_url(url: str) -> str:
    return url + ("&" if "?" in url else "?") + "replica_timeout=1s"


async def enqueue(client, capability: str, **kw) -> pb.Task:  # type: ignore[no-untyped-def]
    resp = await client.dispatch.EnqueueTask(pb.EnqueueTaskRequest(capability=capability, **kw))
    return resp.task


async def all_tasks(client) -> dict[str, pb.Task]:  # type: ignore[no-untyped-def]
    return {t.task_id: t for t in await client.all_tasks()}


# ------------------------------------------------------------------ one queue


async def test_three_replicas_start_together_and_share_one_queue_exactly_once(
    tmp_path: Path, pg_url: str
):
    """Three replicas migrate an empty database at once; agents on every replica
    take from one queue; 600 tasks enqueued through all three are each leased
    once and completed once."""
    with start_replicas(tmp_path, pg_url, 3, *FAST) as servers:
        ledger = Ledger()
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(s)) for s in servers]
            loops = []
            for i in range(6):
                client = clients[i % 3]
                await client.register(f"w{i}", ["job"])
                reader = await client.subscribe(f"w{i}", max_in_flight=4)
                loops.append(asyncio.create_task(agent_loop(client, ledger, f"w{i}", reader)))

            async def produce(client, n: int) -> None:  # type: ignore[no-untyped-def]
                for _ in range(n):
                    task = await enqueue(client, "job", input=struct(n=1))
                    ledger.enqueued.append(task.task_id)

            await asyncio.gather(*(produce(c, 200) for c in clients))
            await eventually(
                lambda: sum(len(v) for v in ledger.completed.values()) >= 600,
                timeout=60,
                what="600 completions",
            )
            final = await all_tasks(clients[1])
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    assert len(final) == 600 and set(final) == set(ledger.enqueued)
    assert ledger.problems(final) == []
    assert ledger.errors == []
    # No task was leased twice: every one assigned once, at attempt 1.
    assert {tuple(v) for v in ledger.assigned.values()} == {(1,)}
    # Agents on every replica took a share (the claim is not one replica's).
    by_agent: dict[str, int] = {}
    for task in final.values():
        by_agent[task.assigned_agent_id] = by_agent.get(task.assigned_agent_id, 0) + 1
    for replica in range(3):
        assert by_agent.get(f"w{replica}", 0) + by_agent.get(f"w{replica + 3}", 0) > 0, by_agent


async def test_an_enqueue_on_one_replica_wakes_an_agent_on_another_at_once(
    tmp_path: Path, pg_migrated_url: str
):
    """Driven by notification: a polling fallback (every 2 s) would show as
    delays of a second on average."""
    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as (a, b):
        async with connect(a) as on_a, connect(b) as on_b:
            await on_b.register("idle", ["wake"])
            reader = await on_b.subscribe("idle", max_in_flight=1)
            delays = []
            for i in range(30):
                started = time.perf_counter()
                task = await enqueue(on_a, "wake", input=struct(i=i))
                got = await assignment(reader)
                delays.append(time.perf_counter() - started)
                assert got.task_id == task.task_id
                await on_b.dispatch.CompleteTask(
                    pb.CompleteTaskRequest(
                        task_id=got.task_id, agent_id="idle", attempt=got.attempt
                    )
                )
            # Pinned to the agent, from the other replica, too.
            pinned = (await on_a.dispatch.EnqueueTask(pb.EnqueueTaskRequest(agent_id="idle"))).task
            assert (await assignment(reader)).task_id == pinned.task_id
            await reader.close()
    delays.sort()
    p50, worst = statistics.median(delays), delays[-1]
    print(f"cross-replica wake-up over 30 tasks: p50 {p50 * 1e3:.1f} ms, max {worst * 1e3:.1f} ms")
    assert p50 < 0.25 and worst < 1.5, delays


async def test_priority_fifo_and_max_in_flight_hold_across_replicas(
    tmp_path: Path, pg_migrated_url: str
):
    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as (a, b):
        async with connect(a) as on_a, connect(b) as on_b:
            low = [await enqueue(on_a, "order", priority=0, name=f"low{i}") for i in range(3)]
            high = [await enqueue(on_b, "order", priority=5, name=f"high{i}") for i in range(2)]
            await on_a.register("o1", ["order"])
            reader = await on_a.subscribe("o1", max_in_flight=2)
            first = [await assignment(reader), await assignment(reader)]
            assert [t.task_id for t in first] == [t.task_id for t in high]
            await reader.expect_quiet(0.3)  # max_in_flight 2: nothing more until one ends
            await on_a.dispatch.CompleteTask(
                pb.CompleteTaskRequest(task_id=first[0].task_id, agent_id="o1", attempt=1)
            )
            assert (await assignment(reader)).task_id == low[0].task_id
            await reader.close()


async def test_cancel_on_one_replica_reaches_the_stream_on_another(
    tmp_path: Path, pg_migrated_url: str
):
    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as (a, b):
        async with connect(a) as on_a, connect(b) as on_b:
            await on_b.register("c1", ["slow"])
            reader = await on_b.subscribe("c1")
            task = await enqueue(on_a, "slow")
            assert (await assignment(reader)).task_id == task.task_id
            await on_a.dispatch.CancelTask(pb.CancelTaskRequest(task_id=task.task_id))
            msg = await reader.next()
            assert msg.WhichOneof("message") == "cancellation"
            assert msg.cancellation.task_id == task.task_id
            await reader.close()


async def test_watches_on_one_replica_show_events_caused_on_another(
    tmp_path: Path, pg_migrated_url: str
):
    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as (a, b):
        async with connect(a) as on_a, connect(b) as on_b:
            watch = StreamReader(on_a.lifecycle.WatchAgents(lpb.WatchAgentsRequest()))
            await watch.call.initial_metadata()
            await on_b.register("seen", ["x"])
            await on_b.lifecycle.ReportState(
                lpb.ReportStateRequest(agent_id="seen", state=lpb.AGENT_STATE_IDLE)
            )
            states = []
            while lpb.AGENT_STATE_IDLE not in states:
                event = await watch.next()
                if event.agent.agent_id == "seen":
                    states.append(event.agent.state)
            await watch.close()

            # A session driven by an agent on b, watched on a.
            from opscore_proto.v1 import workflow_pb2_grpc

            wf_a = workflow_pb2_grpc.WorkflowServiceStub(on_a.channel)
            wf_b = workflow_pb2_grpc.WorkflowServiceStub(on_b.channel)
            definition = json_format.ParseDict(
                {
                    "id": "pair",
                    "tasks": [
                        {"id": "one", "capability": "x"},
                        {"id": "two", "capability": "x", "depends_on": ["one"]},
                    ],
                },
                wpb.WorkflowDefinition(),
            )
            await wf_b.CreateWorkflowDefinition(
                wpb.CreateWorkflowDefinitionRequest(definition=definition)
            )
            session = (
                await wf_b.StartWorkflow(wpb.StartWorkflowRequest(definition_id="pair"))
            ).session
            events = StreamReader(
                wf_a.WatchSession(wpb.WatchSessionRequest(session_id=session.session_id))
            )
            reader = await on_b.subscribe("seen")
            for _ in range(2):
                t = await assignment(reader)
                await on_b.dispatch.CompleteTask(
                    pb.CompleteTaskRequest(task_id=t.task_id, agent_id="seen", attempt=t.attempt)
                )
            while True:
                event = await events.next()
                if event.event.event_type == wpb.SESSION_EVENT_TYPE_SESSION_COMPLETED:
                    break
            await events.close()
            await reader.close()


async def test_two_replicas_completing_sibling_tasks_join_once(
    tmp_path: Path, pg_migrated_url: str
):
    """A fan-out of 20 siblings completed through two replicas at once: the join
    task starts exactly once, after all of them."""
    from opscore_proto.v1 import workflow_pb2_grpc

    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as (a, b):
        async with connect(a) as on_a, connect(b) as on_b:
            wf = workflow_pb2_grpc.WorkflowServiceStub(on_a.channel)
            tasks = [{"id": f"s{i}", "capability": "sib"} for i in range(20)]
            tasks.append(
                {"id": "join", "capability": "join", "depends_on": [f"s{i}" for i in range(20)]}
            )
            definition = json_format.ParseDict(
                {"id": "fan", "tasks": tasks}, wpb.WorkflowDefinition()
            )
            await wf.CreateWorkflowDefinition(
                wpb.CreateWorkflowDefinitionRequest(definition=definition)
            )
            session = (
                await wf.StartWorkflow(wpb.StartWorkflowRequest(definition_id="fan"))
            ).session
            readers = []
            for i, client in enumerate((on_a, on_b)):
                await client.register(f"sib{i}", ["sib"])
                readers.append((client, f"sib{i}", await client.subscribe(f"sib{i}", 20)))
            held: list[tuple[object, str, pb.Task]] = []
            while len(held) < 20:
                for client, agent_id, reader in readers:
                    with contextlib.suppress(TimeoutError):
                        held.append((client, agent_id, await reader.next(0.2)))
            # Complete every sibling at once, half through each replica.
            await asyncio.gather(
                *(
                    client.dispatch.CompleteTask(  # type: ignore[attr-defined]
                        pb.CompleteTaskRequest(
                            task_id=msg.assignment.task.task_id,
                            agent_id=agent_id,
                            attempt=msg.assignment.task.attempt,
                        )
                    )
                    for client, agent_id, msg in held
                )
            )
            await on_b.register("joiner", ["join"])
            joiner = await on_b.subscribe("joiner")
            join = await assignment(joiner)
            assert join.session_id == session.session_id
            await joiner.expect_quiet(0.5)  # never a second join task
            got = await wf.GetSession(wpb.GetSessionRequest(session_id=session.session_id))
            runs = {r.workflow_task_id: r for r in got.session.task_runs}
            assert all(runs[f"s{i}"].state == wpb.TASK_RUN_STATE_COMPLETED for i in range(20))
            join_tasks = [
                t
                for t in (await on_b.all_tasks())
                if t.session_id == session.session_id and t.capability == "join"
            ]
            assert len(join_tasks) == 1
            for _c, _a, reader in readers:
                await reader.close()
            await joiner.close()


# ------------------------------------------------------------------ a replica dies


async def test_timers_and_agents_of_a_killed_replica_are_taken_over(
    tmp_path: Path, pg_migrated_url: str
):
    """What replica a armed (a schedule, a lease expiry, an agent's liveness)
    fires on b after a is SIGKILLed, each exactly once."""
    with start_replicas(tmp_path, fast_url(pg_migrated_url), 2, *FAST) as (a, b):
        async with connect(b) as on_b:
            async with connect(a) as on_a:
                scheduled = await enqueue(on_a, "later", delay=dur(2.5))
                await on_a.register("doomed", ["leased"])
                leased = await enqueue(on_a, "leased", timeout=dur(1.5))
                reader_a = await on_a.subscribe("doomed")
                assert (await assignment(reader_a)).task_id == leased.task_id
                await kill(a)
                await reader_a.close()
            await on_b.register("heir", ["later", "leased"])
            heir = await on_b.subscribe("heir", max_in_flight=4)
            got = {}
            while len(got) < 2:
                t = await assignment(heir, timeout=20)
                got[t.task_id] = t.attempt
            assert got == {scheduled.task_id: 1, leased.task_id: 2}
            await heir.expect_quiet(1.0)  # neither fires twice

            async def offline() -> bool:
                agent = (
                    await on_b.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="doomed"))
                ).agent
                return agent.state == lpb.AGENT_STATE_OFFLINE

            await eventually(offline, timeout=20, what="the dead replica's agent OFFLINE")
            history = await on_b.dispatch.ListTaskAttempts(
                pb.ListTaskAttemptsRequest(task_id=leased.task_id)
            )
            outcomes = [x.outcome for x in history.attempts]
            assert len(outcomes) == 2
            await heir.close()


def _agent(name: str, targets: list[str], runs: dict[str, list[int]]) -> Agent:
    agent = Agent(name, agent_id=name, target=",".join(targets), max_in_flight=4)

    @agent.task("load")
    async def work(task: TaskContext) -> dict:
        runs.setdefault(task.task_id, []).append(task.attempt)
        await asyncio.sleep(0.005)  # a little work, so tasks are in flight at the kill
        return {"task": task.task_id, "attempt": task.attempt}

    return agent


async def _producer(
    client: OpsCoreClient, acked: list[str], stop: asyncio.Event, *, limit: int
) -> None:
    while not stop.is_set() and len(acked) < limit:
        task = await client.enqueue_task("load", input={"n": len(acked)})
        acked.append(task.task_id)


async def _settled(client: OpsCoreClient, acked: list[str]) -> dict[str, pb.Task]:
    final: dict[str, pb.Task] = {}
    for task in [t async for t in client.iter_tasks()]:
        final[task.task_id] = task
    return final


def _check_final(acked: list[str], final: dict[str, pb.Task], runs: dict[str, list[int]]) -> None:
    assert set(acked) == set(final), "an acknowledged enqueue is missing, or an extra task exists"
    assert len(acked) == len(set(acked))
    for task_id in acked:
        task = final[task_id]
        assert task.state == TS.TASK_STATE_COMPLETED, (task_id, TS.Name(task.state))
        # The stored result is the one of the attempt that completed it.
        assert as_dict(task.output) == {"task": task_id, "attempt": task.attempt}


async def test_sigkill_one_of_two_replicas_under_load_loses_nothing(
    tmp_path: Path, pg_migrated_url: str
):
    """Agents and a producer, all given both replicas, keep working through the
    SIGKILL of the replica they were on; every acknowledged task completes once
    with the result of its last attempt."""
    with start_replicas(tmp_path, fast_url(pg_migrated_url), 2, *FAST) as (a, b):
        runs: dict[str, list[int]] = {}
        agents = [
            _agent(f"fo{i}", [a.target, b.target] if i % 2 == 0 else [b.target, a.target], runs)
            for i in range(4)
        ]
        retry = RetryConfig(
            initial_backoff=timedelta(milliseconds=50),
            max_backoff=timedelta(milliseconds=500),
            max_attempts=100,
        )
        acked: list[str] = []
        stop = asyncio.Event()
        async with (
            OpsCoreClient([a.target, b.target], retry=retry) as producer,
            OpsCoreClient(b.target) as watcher,
        ):
            running = [asyncio.create_task(x.run(handle_signals=False)) for x in agents]
            producing = [
                asyncio.create_task(_producer(producer, acked, stop, limit=1500)) for _ in range(2)
            ]
            await eventually(lambda: len(runs) >= 300, timeout=60, what="300 tasks worked on")
            await kill(a)
            killed_at = len(runs)
            await eventually(
                lambda: len(runs) >= killed_at + 300, timeout=60, what="300 more after the kill"
            )
            stop.set()
            await asyncio.gather(*producing)

            async def all_done() -> bool:
                return all(
                    t.state == TS.TASK_STATE_COMPLETED
                    for t in (await _settled(watcher, acked)).values()
                ) and len(await _settled(watcher, acked)) >= len(acked)

            await eventually(all_done, timeout=60, what="every acknowledged task completed")
            final = await _settled(watcher, acked)
            on_b = [
                x.agent_id
                for x in await watcher.list_agents()
                if x.state in (lpb.AGENT_STATE_IDLE, lpb.AGENT_STATE_ACTIVE)
            ]
            for x in agents:
                x.request_shutdown()
            await asyncio.gather(*running, return_exceptions=True)
    _check_final(acked, final, runs)
    # Every agent (half of them had started on the killed replica) is alive on b.
    assert sorted(on_b) == [f"fo{i}" for i in range(4)]
    # Worked twice only what was in flight at the kill (4 agents x 4 slots).
    again = [t for t, attempts in runs.items() if len(attempts) > 1]
    assert len(again) <= 16, again


async def test_postgres_outage_under_load_is_unavailable_then_recovers(
    tmp_path: Path, pg: PgCluster, pg_migrated_url: str
):
    """The database stops under load: both replicas report NOT_SERVING and refuse
    writes and reads with UNAVAILABLE (no hang, no crash); once it is back they serve again by
    themselves and every acknowledged task completes. Then an immediate restart
    (`pg_ctl restart -m immediate`) under load, the same."""
    with start_replicas(tmp_path, pg_migrated_url, 2, *FAST) as servers:
        runs: dict[str, list[int]] = {}
        targets = [s.target for s in servers]
        agents = [_agent(f"db{i}", targets[i % 2 :] + targets[: i % 2], runs) for i in range(2)]
        retry = RetryConfig(
            initial_backoff=timedelta(milliseconds=50),
            max_backoff=timedelta(milliseconds=500),
            max_attempts=1000,
        )
        acked: list[str] = []
        stop = asyncio.Event()
        async with (
            OpsCoreClient(targets, retry=retry) as producer,
            OpsCoreClient(targets[0], retry=RetryConfig(max_attempts=1)) as probe,
        ):
            running = [asyncio.create_task(x.run(handle_signals=False)) for x in agents]
            producing = asyncio.create_task(_producer(producer, acked, stop, limit=100_000))
            await eventually(lambda: len(runs) >= 100, timeout=60, what="100 tasks worked on")

            await asyncio.to_thread(pg.stop, "immediate")
            try:
                for server in servers:
                    await eventually(
                        lambda s=server: _health_is(s, "NOT_SERVING"),
                        timeout=30,
                        what=f"{server.target} NOT_SERVING",
                    )
                with pytest.raises(UnavailableError):
                    await probe.enqueue_task("load", idempotency_key="")
                # Reads too: once an AttributeError in the read path's error
                # handling made every failed read INTERNAL.
                with pytest.raises(UnavailableError):
                    await probe.get_task(acked[0])
                with pytest.raises(UnavailableError):
                    await probe.list_tasks(page_size=10)
            finally:
                await asyncio.to_thread(pg.start)
            for server in servers:
                await eventually(
                    lambda s=server: _health_is(s, "SERVING"),
                    timeout=60,
                    what=f"{server.target} SERVING again",
                )
            before = len(runs)
            await eventually(lambda: len(runs) >= before + 100, timeout=60, what="work resumes")

            await asyncio.to_thread(pg.restart, "immediate")
            before = len(runs)
            await eventually(
                lambda: len(runs) >= before + 100, timeout=90, what="work resumes after restart"
            )
            stop.set()
            await producing

            async def all_done() -> bool:
                final = await _settled(producer, acked)
                return len(final) >= len(acked) and all(
                    t.state == TS.TASK_STATE_COMPLETED for t in final.values()
                )

            await eventually(all_done, timeout=90, what="every acknowledged task completed")
            final = await _settled(producer, acked)
            for x in agents:
                x.request_shutdown()
            await asyncio.gather(*running, return_exceptions=True)
            assert all(s.proc.poll() is None for s in servers), "a replica died"
    _check_final(acked, final, runs)


async def _health(server: ServerProcess) -> str:
    async with grpc.aio.insecure_channel(server.target) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def _health_is(server: ServerProcess, status: str) -> bool:
    return await _health(server) == status
