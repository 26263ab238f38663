"""Streams are filled at the end of a transaction, all of them in one claim
(Tx.claim_many): several agents with different capabilities, pinned tasks and
room, freed in one transaction, each get only what they may take, best first,
never more than their max_in_flight, and no task twice, also with two replicas
taking from one queue."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from tests.conftest import Harness, StreamReader, eventually

pytestmark = pytest.mark.backends("sqlite", "postgres")

TS = pb.TaskState

# agent -> (capabilities, max_in_flight). "x" is wanted by two agents, "y" by
# two, "z" by one that is also sent pinned tasks, "w" by nobody.
AGENTS = {
    "ax": (["x"], 2),
    "bxy": (["x", "y"], 1),
    "cy": (["y"], 3),
    "dz": (["z"], 2),
}


@dataclass
class Stream:
    agent_id: str
    capabilities: list[str]
    max_in_flight: int
    reader: StreamReader
    got: list[pb.Task] = field(default_factory=list)

    def may_take(self, task: pb.Task) -> bool:
        if task.agent_id:
            return task.agent_id == self.agent_id
        return task.capability in self.capabilities

    async def take(self, n: int) -> list[pb.Task]:
        out = []
        for _ in range(n):
            msg = await self.reader.next()
            assert msg.WhichOneof("message") == "assignment", msg
            out.append(msg.assignment.task)
        self.got += out
        return out


async def _open(h: Harness, agent_id: str, caps: list[str], mif: int) -> Stream:
    await h.register(agent_id, caps)
    engine = h.server.dispatch
    reader = StreamReader(
        h.dispatch.SubscribeTasks(pb.SubscribeTasksRequest(agent_id=agent_id, max_in_flight=mif))
    )
    await eventually(
        lambda: engine._subs_by_agent.get(agent_id) or reader.done.is_set(),
        what=f"subscription of {agent_id}",
    )
    return Stream(agent_id, caps, mif, reader)


@contextlib.asynccontextmanager
async def _one_transaction(h: Harness, n_ops: int) -> AsyncIterator[None]:
    """On PostgreSQL, make the `n_ops` operations started inside the block run in
    one transaction: the replica's executor is held on a row lock taken from
    another connection until all of them wait in its queue. (SQLite has no
    transaction of several operations: each one's fills happen at its end.)"""
    storage = h.server.storage
    if storage.kind != "postgres":
        yield
        return
    await h.register("gate")
    conn = await asyncpg.connect(h.config.db)
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute("SELECT 1 FROM agents WHERE agent_id = 'gate' FOR UPDATE")
        gate = asyncio.ensure_future(
            h.lifecycle.ReportState(
                lpb.ReportStateRequest(agent_id="gate", state=lpb.AGENT_STATE_IDLE)
            )
        )
        # The executor is busy with the gate's operation, waiting for the lock.
        await eventually(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ),
            what="the executor waiting for the lock",
        )
        yield
        await eventually(lambda: len(storage._queue) >= n_ops, what=f"{n_ops} operations queued")
        await lock.commit()
        await gate
    finally:
        await conn.close()


def _complete_all(
    h: Harness, held: dict[str, list[pb.Task]]
) -> list[asyncio.Future[pb.CompleteTaskResponse]]:
    """Start a CompleteTask for every task each agent holds, all at once."""
    return [
        asyncio.ensure_future(
            h.dispatch.CompleteTask(
                pb.CompleteTaskRequest(task_id=t.task_id, agent_id=agent, attempt=t.attempt)
            )
        )
        for agent, tasks in held.items()
        for t in tasks
    ]


async def _queued(h: Harness) -> list[pb.Task]:
    page = await h.dispatch.ListTasks(
        pb.ListTasksRequest(state=TS.TASK_STATE_QUEUED, page_size=1000)
    )
    return list(page.tasks)


def _rank(task: pb.Task, order: dict[str, int]) -> tuple[int, int]:
    return (-task.priority, order[task.task_id])


async def test_one_transaction_fills_every_stream_best_first(harness: Harness):
    h = harness
    streams = {a: await _open(h, a, caps, mif) for a, (caps, mif) in AGENTS.items()}
    await h.register("nobody", ["x"])  # without a stream
    # Fill every slot with a first round of tasks.
    first = [
        pb.EnqueueTaskRequest(capability=caps[0], name=f"first-{a}-{i}")
        for a, (caps, mif) in AGENTS.items()
        for i in range(mif)
    ]
    await h.dispatch.EnqueueTasks(pb.EnqueueTasksRequest(tasks=first))
    held = {a: await s.take(AGENTS[a][1]) for a, s in streams.items()}
    # Then the queue every stream is full for: capabilities served and not,
    # priorities mixed, and pinned tasks (to agents with and without the
    # capability, and to one with no stream).
    specs = []
    for i in range(40):
        kind = i % 8
        priority = (i * 7) % 5
        if kind < 3:
            specs.append(pb.EnqueueTaskRequest(capability="x", priority=priority, name=f"x{i}"))
        elif kind < 5:
            specs.append(pb.EnqueueTaskRequest(capability="y", priority=priority, name=f"y{i}"))
        elif kind == 5:
            specs.append(pb.EnqueueTaskRequest(capability="w", priority=9, name=f"w{i}"))
        elif kind == 6:
            agent = ("ax", "dz", "nobody")[(i // 8) % 3]
            specs.append(pb.EnqueueTaskRequest(agent_id=agent, priority=priority, name=f"p{i}"))
        else:
            specs.append(pb.EnqueueTaskRequest(capability="z", priority=priority, name=f"z{i}"))
    resp = await h.dispatch.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs))
    order = {r.task.task_id: n for n, r in enumerate(resp.results)}
    for s in streams.values():
        await s.reader.expect_quiet(0.05)  # all full

    # Every agent completes everything it holds, in one transaction.
    n_ops = sum(len(t) for t in held.values())
    async with _one_transaction(h, n_ops):
        calls = _complete_all(h, held)
    for call in calls:
        assert (await call).task.state == TS.TASK_STATE_COMPLETED

    got = {a: await s.take(AGENTS[a][1]) for a, s in streams.items()}
    for s in streams.values():
        await s.reader.expect_quiet(0.1)  # never more than max_in_flight
    left = await _queued(h)
    assigned = [t for tasks in got.values() for t in tasks]
    assert len({t.task_id for t in assigned}) == len(assigned), "a task was sent twice"
    assert {t.task_id for t in assigned}.isdisjoint(t.task_id for t in left)
    for a, tasks in got.items():
        s = streams[a]
        for t in tasks:
            assert s.may_take(t), f"{a} was sent {t.name} ({t.capability or '@' + t.agent_id})"
            assert t.state == TS.TASK_STATE_ASSIGNED and t.attempt == 1
        # Each stream's tasks come best first...
        assert [_rank(t, order) for t in tasks] == sorted(_rank(t, order) for t in tasks), a
        # ...and nothing left in the queue is better than one it was sent.
        for q in left:
            if s.may_take(q):
                assert all(_rank(t, order) < _rank(q, order) for t in tasks), (a, q.name)
    # What the server says agrees: each task held by the agent it was sent to.
    for a, tasks in got.items():
        for t in tasks:
            stored = (await h.dispatch.GetTask(pb.GetTaskRequest(task_id=t.task_id))).task
            assert stored.state == TS.TASK_STATE_ASSIGNED and stored.assigned_agent_id == a
    for s in streams.values():
        await s.reader.close()


async def test_a_refused_operation_in_the_transaction_leaves_no_stream_short(harness: Harness):
    """A refused call (a stale attempt) in the same transaction as completions
    undoes its own writes only: every freed slot is still filled, once."""
    h = harness
    a = await _open(h, "a1", ["c"], 2)
    b = await _open(h, "b1", ["c"], 1)
    await h.dispatch.EnqueueTasks(
        pb.EnqueueTasksRequest(tasks=[pb.EnqueueTaskRequest(capability="c") for _ in range(3)])
    )
    held = {"a1": await a.take(2), "b1": await b.take(1)}
    more = await h.dispatch.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.EnqueueTaskRequest(capability="c", name=f"n{i}") for i in range(10)]
        )
    )
    async with _one_transaction(h, 4):
        calls = _complete_all(h, held)
        stale = held["a1"][0]
        calls.append(
            asyncio.ensure_future(
                h.dispatch.CompleteTask(
                    pb.CompleteTaskRequest(task_id=stale.task_id, agent_id="a1", attempt=7)
                )
            )
        )
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    got = [*await a.take(2), *await b.take(1)]
    await a.reader.expect_quiet(0.1)
    await b.reader.expect_quiet(0.1)
    names = sorted(t.name for t in got)
    assert names == ["n0", "n1", "n2"], names
    assert len(await _queued(h)) == len(more.results) - 3
    await a.reader.close()
    await b.reader.close()


@pytest.mark.backends("postgres")
async def test_two_replicas_racing_lease_each_task_once(make_harness):
    """Work-stream agents with overlapping capabilities and pinned tasks, spread
    over two replicas, complete as fast as they are sent work: every task is
    leased once (attempt 1), to an agent that may take it, and completed once;
    no stream ever holds more than its max_in_flight."""
    replicas = [await make_harness(), await make_harness()]
    capabilities = (["y"], ["x", "y"], ["x"])
    agents = {f"r{i}": (capabilities[i % 3], 1 + i % 3) for i in range(8)}
    ids = itertools.count(1)
    sent: dict[str, list[pb.Task]] = {a: [] for a in agents}
    violations: list[str] = []
    completed: dict[str, int] = {}
    total = 400
    all_done = asyncio.Event()

    async def agent(n: int, agent_id: str, caps: list[str], mif: int) -> None:
        h = replicas[n % 2]
        await h.register(agent_id, caps)
        call = h.dispatch.Connect()
        await call.write(
            pb.ConnectRequest(hello=pb.ConnectHello(agent_id=agent_id, max_in_flight=mif))
        )
        held: dict[int, str] = {}  # item id -> task id, until its result
        try:
            while not all_done.is_set():
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                items = []
                for m in resp.messages:
                    kind = m.WhichOneof("message")
                    if kind == "assignment":
                        t = m.assignment.task
                        sent[agent_id].append(t)
                        item = next(ids)
                        held[item] = t.task_id
                        if len(held) > mif:
                            violations.append(f"{agent_id} holds {len(held)} > {mif}")
                        for sub, (
                            aid,
                            n,
                            cap,
                        ) in h.server.dispatch.in_flight_by_subscription().items():
                            if n > cap:
                                violations.append(f"server: {aid} sub {sub} holds {n} > {cap}")
                        ok = t.agent_id == agent_id if t.agent_id else t.capability in caps
                        if not ok:
                            violations.append(f"{agent_id} was sent {t.name}")
                        items.append(
                            pb.AgentMessage(
                                id=item,
                                completion=pb.TaskCompletion(task_id=t.task_id, attempt=t.attempt),
                            )
                        )
                    elif kind == "result":
                        held.pop(m.result.id, None)
                        if m.result.task_state == TS.TASK_STATE_COMPLETED:
                            completed[agent_id] = completed.get(agent_id, 0) + 1
                        if sum(completed.values()) >= total:
                            all_done.set()
                if items:
                    await call.write(pb.ConnectRequest(messages=items))
        finally:
            call.cancel()

    loops = [
        asyncio.create_task(agent(n, a, caps, mif))
        for n, (a, (caps, mif)) in enumerate(agents.items())
    ]
    await eventually(
        lambda: all(r.server.dispatch.open_subscriptions() == 4 for r in replicas),
        what="every agent connected",
    )
    pinned_to = [a for a in agents][:3]
    for batch in range(total // 50):
        specs = []
        for i in range(50):
            k = batch * 50 + i
            if k % 5 == 4:
                specs.append(
                    pb.EnqueueTaskRequest(agent_id=pinned_to[k % 3], priority=k % 3, name=f"t{k}")
                )
            else:
                cap = "x" if k % 2 else "y"
                specs.append(pb.EnqueueTaskRequest(capability=cap, priority=k % 3, name=f"t{k}"))
        await replicas[batch % 2].dispatch.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs))
    await asyncio.wait_for(all_done.wait(), 60)
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    assert violations == [], violations[:5]
    leased = [t for tasks in sent.values() for t in tasks]
    assert len(leased) == total
    assert len({t.task_id for t in leased}) == total, "a task was leased twice"
    assert {t.attempt for t in leased} == {1}
    page = await replicas[0].dispatch.ListTasks(
        pb.ListTasksRequest(state=TS.TASK_STATE_COMPLETED, page_size=1000)
    )
    assert len(page.tasks) == total
    # Agents on both replicas took a share (the claims are not one replica's).
    for side in (0, 1):
        assert sum(completed.get(a, 0) for a in list(agents)[side::2]) > 0, completed
