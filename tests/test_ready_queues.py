"""The ready-queue summary (counts and oldest ready time per queue) that metrics
and the no-agent watch read: kept up to date as tasks move, on the SQLite
backend, so reading it does not walk every ready task."""

from __future__ import annotations

from datetime import datetime, timedelta

from opscore_proto.v1 import dispatch_pb2 as pb

from opscore.models import TaskState
from tests.conftest import Harness, eventually
from tests.test_dispatch import assignment, dur, enqueue, subscribe

Queues = dict[tuple[str, str], tuple[int, datetime]]


def walked(h: Harness) -> Queues:
    """The same summary, computed the slow way from every task in memory."""
    out: Queues = {}
    for t in h.server.storage.tasks.values():
        if t.state == TaskState.QUEUED:
            key = (t.capability, t.agent_id)
            n, oldest = out.get(key, (0, t.update_time))
            out[key] = (n + 1, min(oldest, t.update_time))
    return out


def counts(h: Harness) -> dict[tuple[str, str], int]:
    return {k: n for k, (n, _) in h.server.storage.ready_queues().items()}


async def test_ready_queues_follow_every_move_of_a_task(make_harness):
    # A short agent_timeout: an agent whose stream ends soon loses its tasks.
    h = await make_harness(agent_timeout=timedelta(milliseconds=300))
    await h.register("a1", ["c", "d"])
    await h.register("a2", ["c"])
    c_tasks = [await enqueue(h, capability="c") for _ in range(3)]
    d_tasks = [await enqueue(h, capability="d") for _ in range(2)]
    for _ in range(2):
        await enqueue(h, agent_id="a2")
    await enqueue(h, capability="c", delay=dur(3600))  # scheduled: not ready
    assert counts(h) == {("c", ""): 3, ("d", ""): 2, ("", "a2"): 2}
    assert h.server.storage.ready_queues() == walked(h)
    oldest_c = h.server.storage.ready_queues()[("c", "")][1]

    # Two of "c" are taken by a stream; one "d" is cancelled.
    sub = await subscribe(h, "a1", max_in_flight=2, capabilities=["c"])
    taken = {(await assignment(sub)).task_id for _ in range(2)}
    assert taken == {t.task_id for t in c_tasks[:2]}  # oldest first
    await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=d_tasks[0].task_id))
    assert counts(h) == {("c", ""): 1, ("d", ""): 1, ("", "a2"): 2}
    assert h.server.storage.ready_queues() == walked(h)

    # The stream ends and the agent times out: its two tasks are ready again,
    # and now the newest.
    await sub.close()
    await eventually(lambda: counts(h).get(("c", "")) == 3, what="tasks back in the queue")
    assert h.server.storage.ready_queues() == walked(h)
    assert h.server.storage.ready_queues()[("c", "")][1] > oldest_c

    # A queue that empties is gone, not left at zero.
    sub2 = await subscribe(h, "a1", max_in_flight=5, capabilities=["d"])
    await assignment(sub2)
    assert ("d", "") not in counts(h)
    await sub2.close()
    await eventually(lambda: counts(h).get(("d", "")) == 1, what="d back in the queue")

    # A restart loads the same summary from the file.
    before = h.server.storage.ready_queues()
    await h.restart()
    assert h.server.storage.ready_queues() == before == walked(h)
