"""What the API layer spends per task on protobuf, in-process, without gRPC:
building and serializing the responses that carry tasks, and reading the tasks
of an EnqueueTasks request. The minimum of several repeats, so it resolves a few
microseconds where an end-to-end run on a noisy machine cannot.

    python -m bench.tools.convert_cost
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from google.protobuf import struct_pb2
from opscore_proto.v1 import dispatch_pb2 as pb

from opscore.api import convert as c
from opscore.api.servicers import dispatch as servicer
from opscore.models import RetryPolicy, Task, TaskState
from opscore.subscription import Assignment


def _task() -> Task:
    now = datetime.now(UTC)
    s = struct_pb2.Struct()
    s.update({"seq": 12, "t0": time.time()})
    return Task(
        task_id="0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        name="noop",
        capability="bench",
        agent_id="",
        input=s.SerializeToString(deterministic=True),
        priority=0,
        retry_policy=RetryPolicy(),
        timeout=timedelta(seconds=300),
        heartbeat_timeout=None,
        idempotency_key="",
        state=TaskState.ASSIGNED,
        create_time=now,
        update_time=now,
        attempt=1,
        assigned_agent_id="agent-3",
        lease_expire_time=now + timedelta(seconds=300),
        attempt_deadline=now + timedelta(seconds=300),
    )


def main() -> None:
    task = _task()
    assignment = Assignment(task)

    def stream_response(k: int) -> bytes:
        out = pb.ConnectResponse()
        for _ in range(k):
            servicer._write_server_message(out.messages.add(), assignment)
        return out.SerializeToString()

    def enqueue_response(k: int) -> bytes:
        resp = pb.EnqueueTasksResponse()
        for _ in range(k):
            c.fill_task(resp.results.add(created=True).task, task)
        return resp.SerializeToString()

    s = struct_pb2.Struct()
    s.update({"seq": 12, "t0": time.time()})
    request = pb.EnqueueTasksRequest.FromString(
        pb.EnqueueTasksRequest(
            tasks=[pb.EnqueueTaskRequest(name="noop", capability="bench", input=s)] * 100
        ).SerializeToString()
    )

    def read_request(k: int) -> object:
        return [c.task_spec(r) for r in request.tasks]

    cases: list[tuple[str, Callable[[int], object], int]] = [
        ("work-stream response, 1 assignment, built and serialized", stream_response, 1),
        ("work-stream response, 4 assignments", stream_response, 4),
        ("EnqueueTasks response of 100 tasks", enqueue_response, 100),
        ("EnqueueTasks request of 100 tasks, read (convert.task_spec)", read_request, 100),
    ]
    for name, fn, k in cases:
        n = max(1, 20_000 // k)
        best = min(timeit.repeat(lambda fn=fn, k=k: fn(k), number=n, repeat=9))
        print(f"{name}: {best / (n * k) * 1e6:.2f} us per task")


if __name__ == "__main__":
    main()
