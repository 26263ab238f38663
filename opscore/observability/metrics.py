"""Prometheus metrics: every metric family of the server, defined in this module.

Counters and histograms are updated as things happen: the engines' moves through
`MetricsObserver`, RPCs through `RpcMetrics` (the interceptor), commits through
`Metrics.commit_done` (the store's write loop). Gauges (ready queues, agents by
state, open streams, running sessions, database size) are read from engine state
when Prometheus scrapes, by `EngineCollector`, so nothing keeps them in step.

Label values are bounded sets: RPC service, method and status code; task
capability (at most `limits.MAX_METRIC_CAPABILITIES` distinct values, the rest
counted as "(other)"; tasks pinned to an agent without a capability as
"(pinned)": neither can be a capability, whose characters exclude parentheses);
agent, session and attempt states. Never task, session or agent ids.

Names follow the Prometheus conventions: an `opscore_` prefix, base units in
the name (`_seconds`, `_bytes`), counters ending in `_total`. docs/operations.md
lists them all with their meaning and example alerts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from opscore import limits
from opscore.clock import utcnow
from opscore.models import AgentState, AttemptOutcome, Task, TaskAttempt, TaskState
from opscore.observability.observer import EngineObserver
from opscore.workflow.models import Session, SessionState

if TYPE_CHECKING:
    from opscore.dispatch import DispatchEngine
    from opscore.lifecycle import LifecycleEngine
    from opscore.storage.api import Storage as Store
    from opscore.workflow.engine import WorkflowEngine

log = logging.getLogger("opscore.metrics")

PINNED = "(pinned)"
OTHER = "(other)"

# Latency buckets in seconds. RPCs and commits are milliseconds; waiting for an
# agent and running a task span milliseconds to hours.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TASK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Event-loop lag: the timer's own resolution is a millisecond.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# How long a scrape waits for the event loop to copy the engines' state.
SNAPSHOT_TIMEOUT_S = 5.0


class Metrics:
    """The server's metric families, on a registry of their own (several servers
    in one process, as in the tests, do not share counters)."""

    def __init__(self, max_capabilities: int | None = None) -> None:
        # No `_created` series beside every counter and histogram: they double the
        # output and Prometheus does not need them (process-wide, but so is a server).
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        def histogram(
            name: str, doc: str, labels: Iterable[str], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=r)

        # ---- RPCs
        self.rpc_handled = counter(
            "opscore_rpc_handled_total",
            "RPCs finished, by service, method and gRPC status code.",
            ("service", "method", "code"),
        )
        self.rpc_duration = histogram(
            "opscore_rpc_duration_seconds",
            "Time to answer a unary RPC, from its start to its status.",
            ("service", "method"),
            RPC_BUCKETS,
        )
        # ---- tasks, by capability
        cap = ("capability",)
        self.enqueued = counter("opscore_tasks_enqueued_total", "Tasks created.", cap)
        self.assigned = counter(
            "opscore_tasks_assigned_total", "Attempts started: a task leased to an agent.", cap
        )
        self.completed = counter("opscore_tasks_completed_total", "Tasks completed.", cap)
        self.failed = counter("opscore_tasks_failed_total", "Tasks failed permanently.", cap)
        self.retried = counter(
            "opscore_tasks_retried_total",
            "Attempts that ended without success and are followed by another.",
            cap,
        )
        self.lease_expired = counter(
            "opscore_tasks_lease_expired_total",
            "Attempts whose lease passed without a result (timeout or missed heartbeats).",
            cap,
        )
        self.cancelled = counter("opscore_tasks_cancelled_total", "Tasks cancelled.", cap)
        self.attempts_ended = counter(
            "opscore_task_attempts_ended_total",
            "Attempts ended, by how they ended.",
            ("capability", "outcome"),
        )
        self.schedule_to_start = histogram(
            "opscore_task_schedule_to_start_seconds",
            "Time a task waited ready (QUEUED) before an agent was assigned it.",
            cap,
            TASK_BUCKETS,
        )
        self.run_time = histogram(
            "opscore_task_run_seconds",
            "Time from an attempt's assignment to the agent's result (CompleteTask or FailTask).",
            cap,
            TASK_BUCKETS,
        )
        # ---- sessions
        self.sessions_started = counter("opscore_sessions_started_total", "Sessions started.")
        self.sessions_finished = counter(
            "opscore_sessions_finished_total", "Sessions finished, by final state.", ("state",)
        )
        # ---- retention: kinds are the tables opscore.storage.api.PruneKind removes from
        self.pruned_rows = counter(
            "opscore_retention_pruned_rows_total",
            "Rows removed by retention (--retention), by kind (the table they were in): "
            "tasks, task_attempts, sessions, session_events, session_task_runs, "
            "session_definitions, agent_transitions, agents.",
            ("kind",),
        )
        # ---- storage
        self.commit_rows = histogram(
            "opscore_storage_commit_rows",
            "Rows written per group commit (one transaction for every call of a batch).",
            (),
            BATCH_BUCKETS,
        )
        self.commit_duration = histogram(
            "opscore_storage_commit_duration_seconds",
            "Time one group commit took on disk (the transaction, fsync included).",
            (),
            COMMIT_BUCKETS,
        )
        # ---- the server process
        self.loop_lag = histogram(
            "opscore_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 0.1 s: how long every call "
            "in flight waited at that moment.",
            (),
            LAG_BUCKETS,
        )
        self.capabilities = CapabilityLabels(
            limits.MAX_METRIC_CAPABILITIES if max_capabilities is None else max_capabilities
        )

    def commit_done(self, rows: int, seconds: float) -> None:
        """Store.on_commit: one batch is durable."""
        self.commit_rows.observe(rows)
        self.commit_duration.observe(seconds)


class CapabilityLabels:
    """The capability label of a task: its capability while fewer than `limit`
    distinct values have been seen, else "(other)"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, capability: str) -> str:
        label = capability or PINNED
        if label in self._known:
            return label
        if len(self._known) < self.limit:
            self._known.add(label)
            return label
        return OTHER

    def known(self) -> list[str]:
        """Every label handed out so far (gauges report 0 for those with no tasks,
        so a drained queue reads 0 instead of vanishing)."""
        return [*self._known, OTHER] if len(self._known) >= self.limit else list(self._known)


# --------------------------------------------------------------------------- engine moves


@dataclass(slots=True)
class _CapabilityChildren:
    """The labelled children of one capability, bound once: `.labels()` costs a
    lock and a tuple per call, a hot path cannot pay it for every task."""

    enqueued: Any
    assigned: Any
    completed: Any
    failed: Any
    retried: Any
    lease_expired: Any
    cancelled: Any
    schedule_to_start: Any
    run_time: Any
    ended: dict[AttemptOutcome, Any]


_RESULTS = frozenset({AttemptOutcome.COMPLETED, AttemptOutcome.FAILED})


class MetricsObserver(EngineObserver):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        # Raw capability -> children; only for capabilities within the label limit,
        # so this map is bounded too.
        self._children: dict[str, _CapabilityChildren] = {}
        self._by_label: dict[str, _CapabilityChildren] = {}

    def _of(self, task: Task) -> _CapabilityChildren:
        c = self._children.get(task.capability)
        if c is not None:
            return c
        label = self.m.capabilities(task.capability)
        c = self._by_label.get(label)
        if c is None:
            m = self.m
            c = self._by_label[label] = _CapabilityChildren(
                enqueued=m.enqueued.labels(label),
                assigned=m.assigned.labels(label),
                completed=m.completed.labels(label),
                failed=m.failed.labels(label),
                retried=m.retried.labels(label),
                lease_expired=m.lease_expired.labels(label),
                cancelled=m.cancelled.labels(label),
                schedule_to_start=m.schedule_to_start.labels(label),
                run_time=m.run_time.labels(label),
                ended={
                    o: m.attempts_ended.labels(label, o.name)
                    for o in AttemptOutcome
                    if o not in (AttemptOutcome.UNSPECIFIED, AttemptOutcome.RUNNING)
                },
            )
        if label != OTHER:
            self._children[task.capability] = c
        return c

    def task_enqueued(self, task: Task, parent_trace: str) -> str:
        self._of(task).enqueued.inc()
        return ""

    def task_assigned(self, task: Task, waited_seconds: float) -> None:
        c = self._of(task)
        c.assigned.inc()
        c.schedule_to_start.observe(max(0.0, waited_seconds))

    def attempt_ended(self, task: Task, attempt: TaskAttempt) -> None:
        c = self._of(task)
        c.ended[attempt.outcome].inc()
        if attempt.outcome == AttemptOutcome.LEASE_EXPIRED:
            c.lease_expired.inc()
        elif attempt.outcome in _RESULTS and attempt.end_time is not None:
            c.run_time.observe(max(0.0, (attempt.end_time - attempt.assign_time).total_seconds()))

    def task_retrying(self, task: Task) -> None:
        self._of(task).retried.inc()

    def task_finished(self, task: Task) -> None:
        c = self._of(task)
        if task.state == TaskState.COMPLETED:
            c.completed.inc()
        elif task.state == TaskState.FAILED:
            c.failed.inc()
        elif task.state == TaskState.CANCELLED:
            c.cancelled.inc()

    def session_started(self, session: Session) -> str:
        self.m.sessions_started.inc()
        return ""

    def session_finished(self, session: Session) -> None:
        self.m.sessions_finished.labels(session.state.name).inc()

    def rows_pruned(self, table: str, rows: int) -> None:
        self.m.pruned_rows.labels(table).inc(rows)


# --------------------------------------------------------------------------- RPCs


class RpcMetrics:
    """The interceptor's view: the children of one method, bound when the method's
    handler is first wrapped."""

    __slots__ = ("_codes", "_duration", "_handled", "_histogram", "_method", "_service")

    def __init__(self, metrics: Metrics, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self._service, self._method = service, method
        self._handled = metrics.rpc_handled
        self._histogram = metrics.rpc_duration
        self._duration: Any = None  # bound on first use: streams never have one
        self._codes: dict[Any, Any] = {}

    def done(self, code: Any, seconds: float | None) -> None:
        """`code` is a grpc.StatusCode; `seconds` None for streams (their length is
        how long a client keeps them, not a latency)."""
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._handled.labels(self._service, self._method, code.name)
        child.inc()
        if seconds is not None:
            if self._duration is None:
                self._duration = self._histogram.labels(self._service, self._method)
            self._duration.observe(seconds)


# --------------------------------------------------------------------------- gauges


@dataclass(slots=True)
class _Snapshot:
    ready: dict[str, tuple[int, float]]  # label -> (tasks, oldest age in seconds)
    without_agent: dict[str, int]
    agents: dict[str, int]
    streams: dict[str, int]
    sessions: dict[str, int]
    commits: int
    commit_failures: int
    recoveries: int


class EngineCollector(Collector):
    """Reads the engines' state at scrape time.

    prometheus_client calls `collect()` on its HTTP server's thread, while the
    engines belong to the event loop: the state is copied on the loop (one
    callback, bounded by SNAPSHOT_TIMEOUT_S) and turned into metrics on the
    scraping thread. Only the file sizes are read from the scraping thread.
    """

    def __init__(
        self,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        store: Store,
        lifecycle: LifecycleEngine,
        dispatch: DispatchEngine,
        workflow: WorkflowEngine,
        recoveries: Any,
    ) -> None:
        self._metrics = metrics
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._store = store
        self._lifecycle = lifecycle
        self._dispatch = dispatch
        self._workflow = workflow
        self._recoveries = recoveries
        metrics.registry.register(self)

    def describe(self) -> list[Metric]:
        # Registering must not collect: that would wait for the loop from the loop.
        return []

    def _take(self) -> _Snapshot:
        """On the event loop: copy what the gauges need."""
        label = self._metrics.capabilities
        now = utcnow()
        ready: dict[str, tuple[int, float]] = {}
        by_queue = self._dispatch.ready_queues()
        for (cap, _pinned), (n, oldest) in by_queue.items():
            lab = label(cap)
            count, age = ready.get(lab, (0, 0.0))
            ready[lab] = (count + n, max(age, (now - oldest).total_seconds()))
        for lab in label.known():
            ready.setdefault(lab, (0, 0.0))
        without: dict[str, int] = dict.fromkeys(ready, 0)
        caps, agents_with_stream = self._dispatch.connected()
        for (cap, pinned), (n, _) in by_queue.items():
            if (pinned not in agents_with_stream) if pinned else (cap not in caps):
                without[label(cap)] += n
        agents = {s.name: 0 for s in AgentState if s != AgentState.UNSPECIFIED}
        for state, n in self._store.agent_counts().items():
            agents[state.name] = agents.get(state.name, 0) + n
        sessions = {SessionState.PENDING.name: 0, SessionState.RUNNING.name: 0}
        for sstate, n in self._store.session_counts().items():
            sessions[sstate.name] = sessions.get(sstate.name, 0) + n
        return _Snapshot(
            ready=ready,
            without_agent=without,
            agents=agents,
            streams={
                "task_stream": self._dispatch.open_subscriptions(),
                "watch_agents": len(self._lifecycle.events),
                "watch_session": self._workflow.open_watches(),
            },
            sessions=sessions,
            commits=self._store.commits,
            commit_failures=self._store.faults,
            recoveries=self._recoveries(),
        )

    def _snapshot(self) -> _Snapshot | None:
        if threading.get_ident() == self._loop_thread:
            return self._take()
        fut: concurrent.futures.Future[_Snapshot] = concurrent.futures.Future()

        def fill() -> None:
            try:
                fut.set_result(self._take())
            except BaseException as exc:  # handed to the scraping thread
                fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(fill)
            return fut.result(timeout=SNAPSHOT_TIMEOUT_S)
        except Exception as exc:
            log.warning(
                "metrics scrape: could not read the engines' state",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            return None

    def collect(self) -> Iterator[Metric]:
        db, wal = self._store.file_bytes()
        g = GaugeMetricFamily("opscore_storage_database_bytes", "Size of the database file.")
        g.add_metric([], db)
        yield g
        g = GaugeMetricFamily(
            "opscore_storage_wal_bytes", "Size of the database's write-ahead log file."
        )
        g.add_metric([], wal)
        yield g
        snap = self._snapshot()
        if snap is None:
            return
        cap = ["capability"]
        depth = GaugeMetricFamily(
            "opscore_tasks_ready", "Tasks ready (QUEUED) and waiting for an agent.", labels=cap
        )
        age = GaugeMetricFamily(
            "opscore_tasks_ready_oldest_age_seconds",
            "How long the oldest ready task has been waiting for an agent.",
            labels=cap,
        )
        for lab, (n, oldest) in sorted(snap.ready.items()):
            depth.add_metric([lab], n)
            age.add_metric([lab], oldest)
        yield depth
        yield age
        g = GaugeMetricFamily(
            "opscore_tasks_ready_without_agent",
            "Ready tasks that no connected agent can take: no open task stream of an "
            "IDLE or ACTIVE agent serves their capability (or, pinned, is their agent's).",
            labels=cap,
        )
        for lab, n in sorted(snap.without_agent.items()):
            g.add_metric([lab], n)
        yield g
        g = GaugeMetricFamily(
            "opscore_agents",
            "Registered agents by state (deregistered ones excluded).",
            labels=["state"],
        )
        for state, n in snap.agents.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "opscore_open_streams",
            "Open server streams: task_stream (agents' task subscriptions), "
            "watch_agents, watch_session.",
            labels=["kind"],
        )
        for kind, n in snap.streams.items():
            g.add_metric([kind], n)
        yield g
        g = GaugeMetricFamily(
            "opscore_sessions", "Sessions not finished yet, by state.", labels=["state"]
        )
        for state, n in snap.sessions.items():
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily(
            "opscore_storage_commits", "Group commits written.", value=snap.commits
        )
        yield CounterMetricFamily(
            "opscore_storage_commit_failures",
            "Batches that could not be committed (their calls were refused and state "
            "was rebuilt from the database), or changes that failed half-way.",
            value=snap.commit_failures,
        )
        yield CounterMetricFamily(
            "opscore_server_recoveries",
            "Times the server rebuilt its in-memory state from the database.",
            value=snap.recoveries,
        )
