"""Two replicas racing for one name: an idempotency key or a workflow
definition id. One wins, the other's call is answered (at once, or with a
retryable UNAVAILABLE that the SDK retries in place), and no replica's group
commit fails or waits on the other's. Before the keys were held (see
_key_busy in opscore/storage/postgres/backend.py) half of such enqueues ended
UNAVAILABLE and each collision rebuilt a replica's state, ending every stream
on it; before
definition locks were tried instead of waited for, a held one stalled the
replica's whole executor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore.client import OpsCoreClient
from tests.conftest import Harness

pytestmark = pytest.mark.backends("postgres")

ROUNDS, KEYS = 10, 25


async def _until_answered(call: Callable[[], Awaitable[Any]], busy: list[str]) -> Any:
    """The call, retried while it is refused for a key another replica holds."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or "same idempotency_key" not in (
                err.details() or ""
            ):
                raise
            busy.append(err.details() or "")


async def _race(
    replicas: list[Harness], send: Callable[[Harness, str], Awaitable[tuple[str, bool]]]
) -> list[str]:
    busy: list[str] = []
    for r in range(ROUNDS):
        keys = [f"key-{r}-{i}" for i in range(KEYS)]
        answers = await asyncio.gather(
            *(_until_answered(lambda h=h, k=k: send(h, k), busy) for k in keys for h in replicas)
        )
        for i, key in enumerate(keys):
            (id_a, created_a), (id_b, created_b) = answers[2 * i], answers[2 * i + 1]
            assert id_a == id_b, f"{key}: two replicas, two ids"
            assert created_a != created_b, f"{key}: created {created_a}, {created_b}"
    for h in replicas:
        assert h.server is not None and h.server.recoveries == 0, "a replica rebuilt its state"
    return busy


async def test_two_replicas_given_one_task_key_create_one_task(make_harness):
    replicas = [await make_harness(), await make_harness()]

    async def send(h: Harness, key: str) -> tuple[str, bool]:
        resp = await h.dispatch.EnqueueTask(
            pb.EnqueueTaskRequest(capability="c", idempotency_key=key)
        )
        return resp.task.task_id, resp.created

    await _race(replicas, send)
    listed = await replicas[0].dispatch.ListTasks(pb.ListTasksRequest(page_size=1000))
    assert len(listed.tasks) == ROUNDS * KEYS


async def test_two_replicas_given_one_batch_of_keys_create_each_task_once(make_harness):
    """EnqueueTasks holds all its keys at once: with overlapping batches on both
    replicas each key still gets one task."""
    replicas = [await make_harness(), await make_harness()]

    async def send(h: Harness, key: str) -> tuple[str, bool]:
        resp = await h.dispatch.EnqueueTasks(
            pb.EnqueueTasksRequest(
                tasks=[
                    pb.EnqueueTaskRequest(capability="c", idempotency_key=f"{key}-{j}")
                    for j in range(5)
                ]
            )
        )
        created = {r.created for r in resp.results}
        assert len(created) == 1, "a batch is held whole: all created or none"
        return ",".join(r.task.task_id for r in resp.results), created.pop()

    await _race(replicas, send)


async def test_two_replicas_given_one_session_key_start_one_session(make_harness):
    replicas = [await make_harness(), await make_harness()]
    await replicas[0].workflow.CreateWorkflowDefinition(
        wpb.CreateWorkflowDefinitionRequest(source="id: race\ntasks:\n- id: a\n  capability: c\n")
    )

    async def send(h: Harness, key: str) -> tuple[str, bool]:
        resp = await h.workflow.StartWorkflow(
            wpb.StartWorkflowRequest(definition_id="race", idempotency_key=key)
        )
        return resp.session.session_id, resp.created

    await _race(replicas, send)


async def test_the_sdk_retries_a_busy_key_on_the_same_replica(make_harness, caplog):
    """Clients with both replicas as targets, each starting on a different one:
    every enqueue succeeds (the SDK retries IDEMPOTENCY_KEY_BUSY), both get the
    one task, and a busy key moves no client to the other target."""
    replicas = [await make_harness(), await make_harness()]
    targets = [h.target for h in replicas]
    caplog.set_level(logging.INFO, logger="opscore.client")
    async with (
        OpsCoreClient(targets) as first,
        OpsCoreClient(targets[::-1]) as second,
    ):
        for r in range(ROUNDS):
            keys = [f"sdk-{r}-{i}" for i in range(KEYS)]
            tasks = await asyncio.gather(
                *(c.enqueue_task("c", idempotency_key=k) for k in keys for c in (first, second))
            )
            for i, key in enumerate(keys):
                assert tasks[2 * i].task_id == tasks[2 * i + 1].task_id, key
        assert (first.target, second.target) == (targets[0], targets[1])
    messages = [r.getMessage() for r in caplog.records if r.name == "opscore.client"]
    assert any("same idempotency_key" in m for m in messages), "no key was ever busy"
    assert not [m for m in messages if "moving to" in m], "a busy key moved a client"


async def test_a_held_session_key_refuses_its_call_and_then_starts_once(
    make_harness, pg_migrated_url: str
):
    """Another transaction holds a StartWorkflow key: the call with it answers
    IDEMPOTENCY_KEY_BUSY at once; once the key is free it starts the session,
    and the repeat returns that session."""
    from opscore.storage.postgres.backend import _SESSION_KEYS

    h = await make_harness()
    await h.workflow.CreateWorkflowDefinition(
        wpb.CreateWorkflowDefinitionRequest(source="id: k\ntasks:\n- id: a\n  capability: c\n")
    )
    start = wpb.StartWorkflowRequest(definition_id="k", idempotency_key="held-key")
    holder = await asyncpg.connect(pg_migrated_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", _SESSION_KEYS, "held-key"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.workflow.StartWorkflow(start, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "same idempotency_key" in (info.value.details() or "")
        await tx.rollback()
    finally:
        await holder.close()
    first = await h.workflow.StartWorkflow(start, timeout=5)
    again = await h.workflow.StartWorkflow(start, timeout=5)
    assert first.created and not again.created
    assert again.session.session_id == first.session.session_id


async def test_a_held_definition_lock_refuses_at_once_and_stalls_nothing(
    make_harness, pg_migrated_url: str
):
    """Another transaction holds definition "held": creating it answers
    DEFINITION_BUSY at once, the replica's other calls go on meanwhile, and
    once the lock is gone the SDK's create goes through."""
    h = await make_harness()
    source = "id: held\ntasks:\n- id: a\n  capability: c\n"
    holder = await asyncpg.connect(pg_migrated_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('opscore-definition:' || $1, 0))",
            "held",
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.workflow.CreateWorkflowDefinition(
                wpb.CreateWorkflowDefinitionRequest(source=source), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "changing workflow definition 'held'" in (info.value.details() or "")
        enqueued = await h.dispatch.EnqueueTask(pb.EnqueueTaskRequest(capability="c"), timeout=5)
        assert enqueued.created
        await tx.rollback()
    finally:
        await holder.close()
    async with OpsCoreClient(h.target) as client:
        created = await client.create_workflow_definition(source=source)
    assert created.id == "held" and created.version == 1


async def test_two_replicas_changing_definitions_in_opposite_orders(make_harness):
    """Each replica creates the same definitions, one in the other's reverse
    order, through the SDK: every call succeeds, each definition gets one
    version, and neither replica rebuilds its state."""
    replicas = [await make_harness(), await make_harness()]
    names = [f"def-{i}" for i in range(8)]

    def source(name: str) -> str:
        return f"id: {name}\ntasks:\n- id: a\n  capability: c\n"

    async with (
        OpsCoreClient(replicas[0].target) as first,
        OpsCoreClient(replicas[1].target) as second,
    ):
        for _ in range(ROUNDS):
            await asyncio.gather(
                *(first.create_workflow_definition(source=source(n)) for n in names),
                *(second.create_workflow_definition(source=source(n)) for n in reversed(names)),
            )
        for name in names:
            latest = await first.get_workflow_definition(name)
            assert latest.version == 1, f"{name}: the same content stored twice"
    for h in replicas:
        assert h.server is not None and h.server.recoveries == 0, "a replica rebuilt its state"
