"""Prometheus metrics (issue 13): the real endpoint scraped over HTTP after a
scripted workload, and the no-agent log warning."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.request
from collections.abc import Mapping

import grpc
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from opscore.observability.looplag import LoopLagProbe
from opscore.observability.noagent import NoAgentWatch
from tests.conftest import Harness, eventually, expect_error
from tests.support.worker import Fail, Worker
from tests.test_dispatch import assignment, dur, enqueue, struct, subscribe

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: Harness) -> tuple[Samples, str]:
    assert h.server is not None and h.server.metrics_port
    url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode(), resp.headers["Content-Type"]

    text, content_type = await asyncio.to_thread(get)
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def metrics_harness(make_harness, **kw: object) -> Harness:
    return await make_harness(metrics_listen="127.0.0.1:0", **kw)


async def test_scrape_after_a_workload(make_harness):
    h = await metrics_harness(make_harness)
    samples, text = await scrape(h)
    assert "# HELP opscore_tasks_ready " in text and "process_cpu_seconds_total" in text
    assert value(samples, "opscore_agents", state="IDLE") == 0
    assert value(samples, "opscore_storage_database_bytes") > 0

    # Ready work and no agent: the depth rises and is reported as unservable.
    tasks = [await enqueue(h, capability="work", input=struct(n=i)) for i in range(5)]
    samples, _ = await scrape(h)
    assert value(samples, "opscore_tasks_ready", capability="work") == 5
    assert value(samples, "opscore_tasks_ready_without_agent", capability="work") == 5
    assert value(samples, "opscore_tasks_ready_oldest_age_seconds", capability="work") >= 0
    assert value(samples, "opscore_tasks_enqueued_total", capability="work") == 5

    # An agent drains the queue; one task fails once before it succeeds.
    failed_once: set[str] = set()

    def handler(data: Mapping[str, object], task: pb.Task) -> dict[str, object]:
        if data.get("n") == 0 and task.task_id not in failed_once:
            failed_once.add(task.task_id)
            raise Fail("transient")
        return {"ok": True}

    worker = await Worker(h.channel, "w1", {"work": handler}).start()

    async def all_completed() -> bool:
        # The engine counts a completion before its RPC returns; the RPC itself
        # is counted as it returns.
        s, _ = await scrape(h)
        rpc = {"service": "opscore.v1.DispatchService", "method": "CompleteTask", "code": "OK"}
        return (
            value(s, "opscore_tasks_completed_total", capability="work") == 5
            and value(s, "opscore_rpc_handled_total", **rpc) == 5
        )

    await eventually(all_completed, what="5 completions counted")
    samples, _ = await scrape(h)
    assert value(samples, "opscore_tasks_ready", capability="work") == 0
    assert value(samples, "opscore_tasks_ready_without_agent", capability="work") == 0
    assert value(samples, "opscore_tasks_assigned_total", capability="work") == 6
    assert value(samples, "opscore_tasks_retried_total", capability="work") == 1
    assert value(samples, "opscore_tasks_failed_total", capability="work") == 0
    assert (
        value(samples, "opscore_task_attempts_ended_total", capability="work", outcome="FAILED")
        == 1
    )
    assert value(samples, "opscore_task_schedule_to_start_seconds_count", capability="work") == 6
    assert value(samples, "opscore_task_run_seconds_count", capability="work") == 6
    assert value(samples, "opscore_task_run_seconds_bucket", capability="work", le="+Inf") == 6
    rpc = {"service": "opscore.v1.DispatchService"}
    assert value(samples, "opscore_rpc_handled_total", **rpc, method="EnqueueTask", code="OK") == 5
    assert value(samples, "opscore_rpc_handled_total", **rpc, method="CompleteTask", code="OK") == 5
    assert value(samples, "opscore_rpc_handled_total", **rpc, method="FailTask", code="OK") == 1
    assert value(samples, "opscore_rpc_duration_seconds_count", **rpc, method="EnqueueTask") == 5
    # Streams are counted open, and not as latencies.
    assert value(samples, "opscore_open_streams", kind="task_stream") == 1
    assert (
        value(samples, "opscore_rpc_duration_seconds_count", **rpc, method="SubscribeTasks") is None
    )
    assert total(samples, "opscore_agents") == 1
    assert value(samples, "opscore_storage_commits_total") >= 1
    assert value(samples, "opscore_storage_commit_rows_count") >= 1
    assert value(samples, "opscore_storage_commit_duration_seconds_count") >= 1

    # Errors are counted by code.
    await expect_error(
        h.dispatch.CompleteTask(
            pb.CompleteTaskRequest(task_id=tasks[1].task_id, agent_id="x", attempt=9)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await expect_error(
        h.dispatch.GetTask(pb.GetTaskRequest(task_id="missing")), grpc.StatusCode.NOT_FOUND
    )
    samples, _ = await scrape(h)
    assert (
        value(
            samples,
            "opscore_rpc_handled_total",
            **rpc,
            method="CompleteTask",
            code="FAILED_PRECONDITION",
        )
        == 1
    )
    assert (
        value(samples, "opscore_rpc_handled_total", **rpc, method="GetTask", code="NOT_FOUND") == 1
    )
    await worker.stop()
    await eventually(
        lambda: h.server.dispatch.open_subscriptions() == 0, what="the stream to close"
    )
    samples, _ = await scrape(h)
    assert value(samples, "opscore_open_streams", kind="task_stream") == 0


async def test_lease_expiry_cancel_failure_and_sessions(make_harness):
    h = await metrics_harness(make_harness)
    await h.register("a1", ["lease"])
    sub = await subscribe(h, "a1")
    t = await enqueue(
        h,
        capability="lease",
        timeout=dur(0.2),
        retry_policy=common_pb2.RetryPolicy(max_attempts=1),
    )
    await assignment(sub)  # and never answered

    async def expired() -> bool:
        s, _ = await scrape(h)
        return value(s, "opscore_tasks_lease_expired_total", capability="lease") == 1

    await eventually(expired, what="lease expiry counted")
    samples, _ = await scrape(h)
    assert value(samples, "opscore_tasks_failed_total", capability="lease") == 1
    assert value(samples, "opscore_tasks_retried_total", capability="lease") == 0
    # A lease expiry is not a result: no run time observed.
    assert value(samples, "opscore_task_run_seconds_count", capability="lease") == 0
    assert t.task_id

    queued = await enqueue(h, capability="idle")
    await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=queued.task_id))
    pinned = await enqueue(h, agent_id="a1")
    await h.dispatch.CancelTask(pb.CancelTaskRequest(task_id=pinned.task_id))
    samples, _ = await scrape(h)
    assert value(samples, "opscore_tasks_cancelled_total", capability="idle") == 1
    assert value(samples, "opscore_tasks_cancelled_total", capability="(pinned)") == 1

    from opscore_proto.v1 import workflow_pb2 as wpb

    definition = wpb.WorkflowDefinition(
        id="flow", tasks=[wpb.WorkflowTask(id="only", capability="nobody-has-it")]
    )
    started = await h.workflow.StartWorkflow(wpb.StartWorkflowRequest(definition=definition))
    samples, _ = await scrape(h)
    assert value(samples, "opscore_sessions", state="RUNNING") == 1
    assert value(samples, "opscore_sessions_started_total") == 1
    await h.workflow.CancelSession(wpb.CancelSessionRequest(session_id=started.session.session_id))
    samples, _ = await scrape(h)
    assert value(samples, "opscore_sessions", state="RUNNING") == 0
    assert value(samples, "opscore_sessions_finished_total", state="CANCELLED") == 1
    await sub.close()


async def test_capability_labels_are_capped(make_harness, monkeypatch):
    from opscore import limits

    monkeypatch.setattr(limits, "MAX_METRIC_CAPABILITIES", 3)
    h = await metrics_harness(make_harness)
    for i in range(6):
        await enqueue(h, capability=f"cap{i}")
    samples, _ = await scrape(h)
    caps = {dict(lab)["capability"] for (n, lab) in samples if n == "opscore_tasks_enqueued_total"}
    assert caps == {"cap0", "cap1", "cap2", "(other)"}
    assert value(samples, "opscore_tasks_enqueued_total", capability="(other)") == 3
    assert value(samples, "opscore_tasks_ready", capability="(other)") == 3
    ready = {dict(lab)["capability"] for (n, lab) in samples if n == "opscore_tasks_ready"}
    assert ready == caps


async def test_metrics_off_by_default_and_engines_import_neither_library(harness, tmp_path):
    assert harness.server.metrics_port == 0
    assert harness.server.observability.metrics is None
    assert harness.server.observability.tracing is None
    code = (
        "import sys\n"
        "import opscore.dispatch, opscore.lifecycle, opscore.workflow.engine\n"
        "import opscore.server\n"
        "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))]\n"
        "assert not bad, bad\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=tmp_path)
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_metrics_port_in_use_is_refused(make_harness, tmp_path):
    import socket

    from opscore.config import Config
    from opscore.errors import ConfigError
    from opscore.server import OpsCoreServer

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        server = OpsCoreServer(
            Config(
                listen="127.0.0.1:0",
                db=str(tmp_path / "x.db"),
                metrics_listen=f"127.0.0.1:{port}",
            )
        )
        try:
            await server.start()
        except ConfigError as exc:
            assert f"127.0.0.1:{port}" in str(exc)
        else:
            await server.stop()
            raise AssertionError("a taken metrics port must be refused")
    finally:
        holder.close()
    assert not (tmp_path / "x.db").exists()  # refused before the database was touched


async def test_no_agent_warning_is_rate_limited_per_capability(harness, caplog):
    caplog.set_level(logging.INFO, logger="opscore.dispatch")
    watch = NoAgentWatch(harness.server.dispatch, interval_s=1.0, repeat_s=60.0)
    await enqueue(harness, capability="orphan")
    await enqueue(harness, capability="orphan")
    await harness.register("a1", ["served"])
    sub = await subscribe(harness, "a1", max_in_flight=1)
    await enqueue(harness, capability="served")
    await enqueue(harness, capability="served")  # waits: the agent is busy, not absent

    def warnings() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "opscore.dispatch"
        ]

    watch.check(100.0)
    assert warnings() == []  # not yet a full interval: an agent may be reconnecting
    watch.check(101.0)
    [w] = warnings()
    assert w.capability == "orphan" and "no connected agent has that capability" in w.getMessage()
    watch.check(102.0)
    watch.check(150.0)
    assert len(warnings()) == 1  # rate-limited
    watch.check(161.5)
    assert len(warnings()) == 2
    # An agent for it connects: an INFO line, and no more warnings.
    await harness.register("a2", ["orphan"])
    sub2 = await subscribe(harness, "a2", max_in_flight=5)
    watch.check(300.0)
    assert len(warnings()) == 2
    assert any(
        r.levelno == logging.INFO and getattr(r, "capability", None) == "orphan"
        for r in caplog.records
    )
    await sub.close()
    await sub2.close()


async def test_no_agent_watch_runs_in_the_server(make_harness, caplog, monkeypatch):
    from opscore.observability import noagent

    monkeypatch.setattr(noagent, "CHECK_INTERVAL_S", 0.05)
    caplog.set_level(logging.WARNING, logger="opscore.dispatch")
    h = await make_harness()
    await enqueue(h, capability="lonely")
    await eventually(
        lambda: any(getattr(r, "capability", None) == "lonely" for r in caplog.records),
        what="the no-agent warning",
    )
    assert h.server is not None


async def test_metrics_listen_setting(tmp_path):
    from opscore.config import from_sources
    from opscore.errors import ConfigError

    cfg = from_sources({}, {"OPSCORE_METRICS_LISTEN": "127.0.0.1:9464"})
    assert cfg.metrics_listen == "127.0.0.1:9464" and cfg.otlp_endpoint is None
    cfg = from_sources({"otlp_endpoint": "http://127.0.0.1:4317"}, {})
    assert cfg.otlp_endpoint == "http://127.0.0.1:4317"
    for bad in ({"metrics_listen": "9464"}, {"otlp_endpoint": "http://a b"}):
        try:
            from_sources(bad, {})
        except ConfigError:
            continue
        raise AssertionError(f"{bad} must be refused")


async def test_loop_lag_probe_sees_a_held_loop_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="opscore.server")
    seen: list[float] = []
    probe = LoopLagProbe(seen.append, interval_s=0.01, warn_s=0.2, repeat_s=60.0)
    probe.start()
    try:
        await eventually(lambda: len(seen) >= 3, what="the probe ticking")
        assert max(seen) < 0.2  # nothing held the loop yet
        for _ in range(2):
            time.sleep(0.3)  # noqa: ASYNC251 -- holding the loop is what is under test
            ticks = len(seen)
            await eventually(lambda n=ticks: len(seen) > n, what="a tick after the stall")
    finally:
        probe.stop()
    assert sum(lag >= 0.25 for lag in seen) == 2
    held = [r for r in caplog.records if "event loop was held up" in r.getMessage()]
    assert len(held) == 1  # the second stall came within repeat_s
    assert held[0].lag_s >= 0.25  # type: ignore[attr-defined]


async def test_loop_lag_is_a_metric(make_harness):
    h = await metrics_harness(make_harness)
    name = "opscore_event_loop_lag_seconds"

    async def observed() -> Samples | None:
        samples, _ = await scrape(h)
        return samples if (value(samples, f"{name}_count") or 0) >= 2 else None

    samples = await eventually(observed, what="lag observations")
    assert value(samples, f"{name}_bucket", le="0.25") == value(samples, f"{name}_count")
    time.sleep(0.35)  # noqa: ASYNC251 -- the server runs on this loop: hold it

    async def stall_counted() -> bool:
        s, _ = await scrape(h)
        return (value(s, f"{name}_bucket", le="0.25") or 0) < (value(s, f"{name}_count") or 0)

    await eventually(stall_counted, what="the stall in the histogram")


def test_postgres_stats_refresh_takes_a_bounded_share_of_the_database() -> None:
    """The background counts read every ready task: however long one takes, the
    wait after it keeps the refresh busy at most 1/STATS_DUTY of the time."""
    from opscore.storage.postgres.backend import STATS_DUTY, STATS_INTERVAL, stats_wait

    assert stats_wait(0.0) == stats_wait(0.01) == STATS_INTERVAL
    assert stats_wait(2.0) == 2.0 * STATS_DUTY
    for took in (0.0, 0.1, 0.25, 0.3, 1.0, 10.0, 120.0):
        assert took / (took + stats_wait(took)) <= 1 / STATS_DUTY
