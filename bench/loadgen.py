"""Load generator processes: `python -m bench.loadgen ROLE CONFIG_JSON`.

They use the raw generated stubs (opscore_proto) with grpc.aio, never the SDK.
Protocol with the orchestrator (bench/common.py LoadGen): this process prints
`READY` once set up, `P <n>` progress lines, and finally `RESULT <json>`; it reads
`GO` (start the measured work) and `STOP` (finish and report) on stdin.

Roles:
  agents      RegisterAgent, then per agent either (shape "unary") SubscribeTasks
              and a CompleteTask call per assignment, or (shape "stream") one
              Connect work stream: every assignment completed on the stream, the
              completions of one received message sent back as one message
  enqueue     EnqueueTask (unary) or EnqueueTasks (batch), flat out or at a fixed rate
  reporters   ReportState in a closed loop per agent
  workflow    CreateWorkflowDefinition / StartWorkflow / WatchSession drivers
  celery      Celery producer (baseline): apply_async N no-op tasks, wait for results

Every loop is bounded both in count and in time (`deadline_s` in the config).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from opscore_proto.v1 import (
    dispatch_pb2,
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
)

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine

CHANNEL_OPTIONS = [
    # Without this, grpc shares one TCP connection among channels to the same
    # target; an agent per channel must mean a connection per agent.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Control:
    """GO/STOP words from stdin, as asyncio events."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.go = asyncio.Event()
        self.stop = asyncio.Event()

        def reader() -> None:
            for line in sys.stdin:
                word = line.strip()
                if word == "GO":
                    loop.call_soon_threadsafe(self.go.set)
                elif word == "STOP":
                    loop.call_soon_threadsafe(self.stop.set)
            loop.call_soon_threadsafe(self.stop.set)  # orchestrator gone: stop

        threading.Thread(target=reader, daemon=True).start()


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def struct(**fields: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


# What every no-op task returns (CompleteTask output, TaskCompletion output).
OK_OUTPUT = struct(ok=True)


async def gather_limited(factories: list[Any], limit: int) -> list[Any]:
    """Run the calls made by `factories` with at most `limit` in flight (a grpc.aio
    call starts when it is created, so the calls must be created lazily)."""
    sem = asyncio.Semaphore(limit)

    async def one(make: Any) -> Any:
        async with sem:
            return await make()

    return await asyncio.gather(*(one(f) for f in factories))


async def progress_loop(get: Any, stop: asyncio.Event, every: float = 0.05) -> None:
    last = -1
    while not stop.is_set():
        n = get()
        if n != last:
            emit(f"P {n}")
            last = n
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


# --------------------------------------------------------------------------- agents


async def role_agents(cfg: dict[str, Any]) -> dict[str, Any]:
    """N agents in this process; each subscribes and completes what it is given.

    Config: target, n_agents, id_prefix, capability, max_in_flight, agents_per_channel,
    shape ("unary": SubscribeTasks + CompleteTask; "stream": Connect), deadline_s,
    verify (check open_subscriptions with ListAgents before READY), open_limit (how
    many streams are being opened at once), window_s (also return the latencies
    grouped by the monotonic-clock window of their enqueue time), two_phase (say
    REGISTERED once the agents are registered and open the streams on GO).
    """
    ctl = Control()
    target = cfg["target"]
    n = cfg["n_agents"]
    per_channel = max(1, cfg.get("agents_per_channel", 1))
    cap = cfg.get("capability", "bench")
    max_in_flight = cfg.get("max_in_flight", 1)
    shape = cfg.get("shape", "unary")
    if shape not in ("unary", "stream"):
        raise ValueError(f"unknown agent shape {shape!r}")
    window_s = cfg.get("window_s")
    deadline = now() + cfg.get("deadline_s", 600)
    ids = [f"{cfg['id_prefix']}-{i:05d}" for i in range(n)]
    # A capability only this process's agents have, so that checking their
    # subscriptions with ListAgents lists these agents and no others.
    own_cap = f"{cap}-{cfg['id_prefix']}"
    channels = [channel(target) for _ in range((n + per_channel - 1) // per_channel)]
    lstubs = [lifecycle_pb2_grpc.LifecycleServiceStub(c) for c in channels]
    dstubs = [dispatch_pb2_grpc.DispatchServiceStub(c) for c in channels]

    t_setup = now()
    await gather_limited(
        [
            functools.partial(
                lstubs[i // per_channel].RegisterAgent,
                lifecycle_pb2.RegisterAgentRequest(
                    agent_id=aid, name="bench-agent", version="1", capabilities=[cap, own_cap]
                ),
                timeout=120,
            )
            for i, aid in enumerate(ids)
        ],
        limit=64,
    )
    register_s = now() - t_setup
    if cfg.get("two_phase", False):
        # Open the streams on GO, so that the orchestrator times the opening of
        # every process's streams together, apart from registration.
        emit("REGISTERED")
        await asyncio.wait_for(ctl.go.wait(), 600)

    completed = 0
    first_assign: float | None = None
    last_complete = 0.0
    latencies: list[float] = []  # enqueue (t0 in the task input) -> assignment received
    windows: dict[int, list[float]] = {}  # the same, by window of t0 (window_s)
    complete_lat: list[float] = []
    errors: Counter[str] = Counter()
    stream_ends: Counter[str] = Counter()
    opened = 0
    # Opening many streams at once is bounded, like a fleet with backoff; the
    # time until all are verified open is reported either way.
    opening = asyncio.Semaphore(cfg.get("open_limit", 1000))

    def received(task: Any, t: float) -> None:
        nonlocal first_assign
        if first_assign is None:
            first_assign = t
        t0 = task.input.fields.get("t0")
        if t0 is not None:
            lat = t - t0.number_value
            latencies.append(lat)
            if window_s:
                windows.setdefault(int(t0.number_value // window_s), []).append(round(lat, 6))

    async def stream_agent(i: int, aid: str) -> None:
        """One work stream: completions answer assignments on the same stream, all
        of one received message's in one message; a completion counts once the
        server's AgentMessageResult accepts it (as CompleteTask's reply does)."""
        nonlocal completed, last_complete, opened
        dstub = dstubs[i // per_channel]
        async with opening:
            call = dstub.Connect()
            await call.write(
                dispatch_pb2.ConnectRequest(
                    hello=dispatch_pb2.ConnectHello(agent_id=aid, max_in_flight=max_in_flight)
                )
            )
            first = await call.read()
        if first is grpc.aio.EOF or not first.HasField("accepted"):
            stream_ends["no accepted"] += 1
            return
        opened += 1
        sent_at: dict[int, float] = {}
        next_id = 1
        pending = list(first.messages)
        try:
            while True:
                if pending:
                    resp_messages, pending = pending, []
                else:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break
                    resp_messages = resp.messages
                t = now()
                out = []
                for m in resp_messages:
                    kind = m.WhichOneof("message")
                    if kind == "assignment":
                        task = m.assignment.task
                        received(task, t)
                        out.append(
                            dispatch_pb2.AgentMessage(
                                id=next_id,
                                completion=dispatch_pb2.TaskCompletion(
                                    task_id=task.task_id, attempt=task.attempt, output=OK_OUTPUT
                                ),
                            )
                        )
                        sent_at[next_id] = t
                        next_id += 1
                    elif kind == "result":
                        r = m.result
                        t_sent = sent_at.pop(r.id, None)
                        if r.code:
                            errors[f"completion code {r.code} {r.reason}"] += 1
                            continue
                        completed += 1
                        last_complete = max(last_complete, t)
                        if t_sent is not None:
                            complete_lat.append(t - t_sent)
                if out:
                    await call.write(dispatch_pb2.ConnectRequest(messages=out))
            stream_ends["ended by server"] += 1
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            if not ctl.stop.is_set():
                stream_ends[e.code().name] += 1
                print(f"{aid}: Connect ended: {e.code().name}: {e.details()}", file=sys.stderr)

    async def agent(i: int, aid: str) -> None:
        nonlocal completed, last_complete, opened
        dstub = dstubs[i // per_channel]
        call = dstub.SubscribeTasks(
            dispatch_pb2.SubscribeTasksRequest(agent_id=aid, max_in_flight=max_in_flight)
        )
        opened += 1
        inflight: set[asyncio.Task[None]] = set()

        async def complete(task: Any) -> None:
            nonlocal completed, last_complete
            t = now()
            try:
                await dstub.CompleteTask(
                    dispatch_pb2.CompleteTaskRequest(
                        task_id=task.task_id,
                        agent_id=aid,
                        attempt=task.attempt,
                        output=OK_OUTPUT,
                    ),
                    timeout=60,
                )
            except grpc.aio.AioRpcError as e:
                errors[f"CompleteTask {e.code().name}"] += 1
                return
            t2 = now()
            complete_lat.append(t2 - t)
            completed += 1
            last_complete = max(last_complete, t2)

        try:
            async for msg in call:
                if not msg.HasField("assignment"):
                    continue
                task = msg.assignment.task
                received(task, now())
                if max_in_flight == 1:
                    await complete(task)
                else:
                    job = asyncio.ensure_future(complete(task))
                    inflight.add(job)
                    job.add_done_callback(inflight.discard)
            stream_ends["ended by server"] += 1
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            if not ctl.stop.is_set():
                stream_ends[e.code().name] += 1
                print(
                    f"{aid}: SubscribeTasks ended: {e.code().name}: {e.details()}", file=sys.stderr
                )

    run_agent = stream_agent if shape == "stream" else agent
    t_open = now()
    tasks = [asyncio.ensure_future(run_agent(i, aid)) for i, aid in enumerate(ids)]

    # Wait until the server counts every subscription as open.
    verified = 0
    if cfg.get("verify", True):
        pause = 0.05
        verify_end = min(deadline, now() + cfg.get("verify_timeout_s", 120))
        while now() < verify_end:
            verified = await count_open(lstubs[0], own_cap, set(ids))
            if verified >= n:
                break
            print(f"{now() - t_setup:.1f}s: {verified}/{n} subscriptions open", file=sys.stderr)
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)
        if verified < n and not cfg.get("allow_partial", False):
            raise RuntimeError(f"only {verified}/{n} subscriptions open before the deadline")
    ready_s = now() - t_setup
    open_s = now() - t_open
    emit("READY")
    prog = asyncio.ensure_future(progress_loop(lambda: completed, ctl.stop))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctl.stop.wait(), max(0.0, deadline - now()))
    ctl.stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await prog
    for c in channels:
        await c.close()
    return {
        "completed": completed,
        "first_assign_t": first_assign,
        "last_complete_t": last_complete,
        "assign_latencies_s": latencies if cfg.get("return_latencies", True) else [],
        "assign_windows": {str(k): v for k, v in windows.items()},
        "complete_rpc_p50_ms": _p(complete_lat, 50),
        "complete_rpc_p99_ms": _p(complete_lat, 99),
        "errors": dict(errors),
        "stream_ends": dict(stream_ends),
        "register_s": register_s,
        "ready_s": ready_s,
        "open_s": open_s,
        "opened": opened,
        "shape": shape,
        "verified_open": verified,
        "channels": len(channels),
    }


def _p(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k] * 1000


async def count_open(stub: Any, cap: str, ids: set[str]) -> int:
    """How many of `ids` the server lists with an open subscription."""
    count, token = 0, ""
    for _ in range(10_000):
        resp = await stub.ListAgents(
            lifecycle_pb2.ListAgentsRequest(capability=cap, page_size=1000, page_token=token),
            timeout=60,
        )
        count += sum(1 for a in resp.agents if a.agent_id in ids and a.open_subscriptions > 0)
        token = resp.next_page_token
        if not token:
            break
    return count


# --------------------------------------------------------------------------- enqueue


async def role_enqueue(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue `n` tasks: unary EnqueueTask or batched EnqueueTasks.

    Flat out (`rate` 0: `concurrency` calls in flight) or open loop at `rate`
    tasks/s (a call is started at its scheduled time whether or not earlier ones
    have returned, up to `max_outstanding`). Each task's input carries `t0`, the
    monotonic time just before its call, so agents can time enqueue -> assignment.
    """
    ctl = Control()
    n = cfg["n"]
    mode = cfg.get("mode", "unary")
    batch = cfg.get("batch_size", 1000)
    concurrency = cfg.get("concurrency", 64)
    rate = cfg.get("rate", 0)
    cap = cfg.get("capability", "bench")
    deadline_s = cfg.get("deadline_s", 600)
    ch = channel(cfg["target"])
    stub = dispatch_pb2_grpc.DispatchServiceStub(ch)
    await asyncio.wait_for(ch.channel_ready(), 30)
    emit("READY")
    await asyncio.wait_for(ctl.go.wait(), 600)
    deadline = now() + deadline_s

    call_lat: list[float] = []
    # With window_s: per monotonic-clock window, the call latencies and how late
    # the calls started (the generator's own health, over time).
    window_s = cfg.get("window_s")
    call_windows: dict[int, list[float]] = {}
    behind_windows: dict[int, float] = {}
    errors: Counter[str] = Counter()
    sent = 0

    # As the SDK does by default: a fresh idempotency key per task.
    key_prefix = f"{uuid.uuid4().hex}-" if cfg.get("keyed") else ""

    def req(i: int, t0: float) -> dispatch_pb2.EnqueueTaskRequest:
        return dispatch_pb2.EnqueueTaskRequest(
            name="noop",
            capability=cap,
            input=struct(seq=i, t0=t0),
            idempotency_key=f"{key_prefix}{i}" if key_prefix else "",
        )

    async def send(first: int, count: int) -> None:
        nonlocal sent
        t0 = now()
        try:
            if mode == "batch":
                await stub.EnqueueTasks(
                    dispatch_pb2.EnqueueTasksRequest(
                        tasks=[req(i, t0) for i in range(first, first + count)]
                    ),
                    timeout=120,
                )
            else:
                await stub.EnqueueTask(req(first, t0), timeout=120)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] += count
            return
        lat = now() - t0
        call_lat.append(lat)
        if window_s:
            call_windows.setdefault(int(t0 // window_s), []).append(round(lat, 6))
        sent += count

    step = batch if mode == "batch" else 1
    chunks = [(i, min(step, n - i)) for i in range(0, n, step)]
    t_start = now()
    max_behind = 0.0
    if not rate:
        it = iter(chunks)

        async def worker() -> None:
            for first, count in it:
                if now() > deadline:
                    return
                await send(first, count)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        outstanding: set[asyncio.Task[None]] = set()
        limit = cfg.get("max_outstanding", 2000)
        for k, (first, count) in enumerate(chunks):
            due = t_start + first / rate
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            behind = now() - due
            max_behind = max(max_behind, behind)
            if window_s:
                k = int(due // window_s)
                behind_windows[k] = max(behind_windows.get(k, 0.0), behind)
            if now() > deadline:
                break
            while len(outstanding) >= limit:
                await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
            job = asyncio.ensure_future(send(first, count))
            outstanding.add(job)
            job.add_done_callback(outstanding.discard)
            del k
        if outstanding:
            await asyncio.wait(outstanding, timeout=max(1.0, deadline - now()))
    t_end = now()
    await ch.close()
    s = sorted(call_lat)
    return {
        "t_start": t_start,
        "t_end": t_end,
        "sent": sent,
        "errors": dict(errors),
        "calls": len(call_lat),
        "call_p50_ms": _p(s, 50),
        "call_p99_ms": _p(s, 99),
        "max_behind_s": max_behind,
        "call_windows": {str(k): v for k, v in call_windows.items()},
        "behind_windows": {str(k): v for k, v in behind_windows.items()},
    }


# --------------------------------------------------------------------------- reporters


async def role_reporters(cfg: dict[str, Any]) -> dict[str, Any]:
    """N agents each calling ReportState in a closed loop (next call when the last
    returns) for `duration_s`, alternating ACTIVE and IDLE."""
    ctl = Control()
    n = cfg["n_agents"]
    per_channel = max(1, cfg.get("agents_per_channel", 1))
    duration = cfg["duration_s"]
    ids = [f"{cfg['id_prefix']}-{i:05d}" for i in range(n)]
    channels = [channel(cfg["target"]) for _ in range((n + per_channel - 1) // per_channel)]
    stubs = [lifecycle_pb2_grpc.LifecycleServiceStub(c) for c in channels]
    await gather_limited(
        [
            functools.partial(
                stubs[i // per_channel].RegisterAgent,
                lifecycle_pb2.RegisterAgentRequest(agent_id=aid, name="bench-reporter"),
                timeout=120,
            )
            for i, aid in enumerate(ids)
        ],
        limit=64,
    )
    emit("READY")
    await asyncio.wait_for(ctl.go.wait(), 600)
    lat: list[float] = []
    errors: Counter[str] = Counter()
    states = (lifecycle_pb2.AGENT_STATE_ACTIVE, lifecycle_pb2.AGENT_STATE_IDLE)
    t_start = now()
    cpu0 = time.process_time()
    end = t_start + duration

    async def reporter(i: int, aid: str) -> None:
        stub = stubs[i // per_channel]
        k = 0
        while now() < end and not ctl.stop.is_set():
            t = now()
            try:
                await stub.ReportState(
                    lifecycle_pb2.ReportStateRequest(
                        agent_id=aid, state=states[k % 2], details=struct(seq=k)
                    ),
                    timeout=30,
                )
                lat.append(now() - t)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
            k += 1

    await asyncio.gather(*(reporter(i, aid) for i, aid in enumerate(ids)))
    t_end = now()
    for c in channels:
        await c.close()
    return {
        "t_start": t_start,
        "t_end": t_end,
        "cpu_s": time.process_time() - cpu0,
        "ok": len(lat),
        "errors": dict(errors),
        "latencies_s": lat,
    }


# --------------------------------------------------------------------------- workflow


async def role_workflow(cfg: dict[str, Any]) -> dict[str, Any]:
    """Workflow drivers against WorkflowService (protos only, no SDK).

    mode chain:  a `steps`-task linear chain, `sessions` sessions one after another;
                 per session: StartWorkflow -> WatchSession terminal event.
    mode fanout: one root, `width` parallel tasks, one join; `sessions` sessions.
    mode starts: StartWorkflow of a one-task definition, `n` starts with
                 `concurrency` in flight; sessions started per second.
    Answers {"unavailable": "..."} when the service is UNIMPLEMENTED.
    """
    from opscore_proto.v1 import workflow_pb2, workflow_pb2_grpc

    ctl = Control()
    ch = channel(cfg["target"])
    stub = workflow_pb2_grpc.WorkflowServiceStub(ch)
    await asyncio.wait_for(ch.channel_ready(), 30)
    cap = cfg.get("capability", "wf")
    mode = cfg["mode"]
    tag = cfg.get("tag", "bench")

    def wtask(tid: str, deps: list[str]) -> Any:
        return workflow_pb2.WorkflowTask(id=tid, name=tid, capability=cap, depends_on=deps)

    if mode == "chain":
        steps = cfg["steps"]
        tasks = [wtask(f"s{i:02d}", [f"s{i - 1:02d}"] if i else []) for i in range(steps)]
    elif mode == "fanout":
        width = cfg["width"]
        mids = [f"m{i:04d}" for i in range(width)]
        tasks = [wtask("root", []), *(wtask(m, ["root"]) for m in mids), wtask("join", mids)]
    else:
        tasks = [wtask("only", [])]
    definition = workflow_pb2.WorkflowDefinition(
        id=f"{tag}-{mode}", name=f"bench {mode}", version=1, tasks=tasks
    )
    try:
        await stub.CreateWorkflowDefinition(
            workflow_pb2.CreateWorkflowDefinitionRequest(definition=definition), timeout=60
        )
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            emit("READY")
            return {"unavailable": f"WorkflowService answered UNIMPLEMENTED ({e.details()})"}
        raise
    emit("READY")
    await asyncio.wait_for(ctl.go.wait(), 600)
    cpu0 = time.process_time()
    deadline = now() + cfg.get("deadline_s", 600)
    terminal = {
        workflow_pb2.SESSION_EVENT_TYPE_SESSION_COMPLETED: "COMPLETED",
        workflow_pb2.SESSION_EVENT_TYPE_SESSION_FAILED: "FAILED",
        workflow_pb2.SESSION_EVENT_TYPE_SESSION_CANCELLED: "CANCELLED",
    }

    async def run_one() -> tuple[float, str]:
        t = now()
        resp = await stub.StartWorkflow(
            workflow_pb2.StartWorkflowRequest(definition_id=definition.id, input=struct(t0=t)),
            timeout=60,
        )
        outcome = "stream ended without a terminal event"
        watch = stub.WatchSession(
            workflow_pb2.WatchSessionRequest(session_id=resp.session.session_id),
            timeout=max(1.0, deadline - now()),
        )
        async for ev in watch:
            if ev.event.event_type in terminal:
                outcome = terminal[ev.event.event_type]
                break
        watch.cancel()
        return now() - t, outcome

    if mode in ("chain", "fanout"):
        durations: list[float] = []
        outcomes: Counter[str] = Counter()
        for _ in range(cfg["sessions"]):
            if now() > deadline:
                break
            d, outcome = await run_one()
            outcomes[outcome] += 1
            durations.append(d)
        result: dict[str, Any] = {"durations_s": durations, "outcomes": dict(outcomes)}
    else:
        n = cfg["n"]
        lat: list[float] = []
        errors: Counter[str] = Counter()
        it = iter(range(n))
        t_start = now()

        async def starter() -> None:
            for i in it:
                if now() > deadline:
                    return
                t = now()
                try:
                    await stub.StartWorkflow(
                        workflow_pb2.StartWorkflowRequest(
                            definition_id=definition.id, input=struct(seq=i)
                        ),
                        timeout=60,
                    )
                    lat.append(now() - t)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1

        await asyncio.gather(*(starter() for _ in range(cfg.get("concurrency", 32))))
        result = {
            "started": len(lat),
            "seconds": now() - t_start,
            "errors": dict(errors),
            "start_p50_ms": _p(lat, 50),
            "start_p99_ms": _p(lat, 99),
        }
    await ch.close()
    result["cpu_s"] = time.process_time() - cpu0
    return result


# --------------------------------------------------------------------------- celery


async def role_celery(cfg: dict[str, Any]) -> dict[str, Any]:
    """Celery baseline producer: send `n` no-op tasks (apply_async, one at a time,
    the way a Celery client sends), then wait until the result backend holds `n`
    results. Same input payload as the Ops-Core enqueuers."""
    import redis

    from bench.baselines.celery_app import make_app

    ctl = Control()
    app = make_app(cfg["broker"], cfg["backend"])
    noop = app.tasks["bench.noop"]
    backend = redis.Redis.from_url(cfg["backend"])
    backend.ping()
    with app.producer_or_acquire() as producer:
        # A first connection so connect time is not measured.
        producer.connection.ensure_connection(max_retries=3)
        emit("READY")
        await asyncio.wait_for(ctl.go.wait(), 600)
        n = cfg["n"]
        deadline = now() + cfg.get("deadline_s", 600)
        cpu0 = time.process_time()
        t_start = now()
        for i in range(n):
            noop.apply_async(({"seq": i, "t0": now()},), producer=producer)
            if i % 500 == 0 and now() > deadline:
                break
        t_sent = now()
    done = 0
    while now() < deadline:
        done = backend.dbsize()
        emit(f"P {done}")
        if done >= n:
            break
        await asyncio.sleep(0.005)
    t_end = now()
    return {
        "t_start": t_start,
        "t_sent": t_sent,
        "t_end": t_end,
        "completed": done,
        "n": n,
        "cpu_s": time.process_time() - cpu0,
    }


ROLES = {
    "agents": role_agents,
    "enqueue": role_enqueue,
    "reporters": role_reporters,
    "workflow": role_workflow,
    "celery": role_celery,
}


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    result = asyncio.run(ROLES[role](cfg))
    emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
