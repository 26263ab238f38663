"""`opscore sessions ...`: start, inspect, cancel and watch workflow sessions.

Watching shows the state of each task in the words the filters use (`waiting`
for its dependencies, then the dispatch states `queued`, `assigned`,
`scheduled` for a retry, and `completed`, `failed`, `cancelled`, `replaced`,
`skipped`): a live table on a terminal, one line per event when the output is a
pipe or a file, and one JSON object per event with --json. A task that stays
queued while no connected agent could take it is pointed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import click
from opscore_proto.v1 import workflow_pb2
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from opscore.cli import ids
from opscore.cli.common import (
    EXIT_FAILED,
    Cli,
    age,
    client_command,
    compact_json,
    details_table,
    limit_option,
    message_json,
    parse_payload,
    pretty,
    short_name,
    state_choice,
    styled,
    table,
    take,
    timestamp,
    watch_notes,
)
from opscore.cli.coverage import nobody_for_task
from opscore.client import to_datetime, to_dict
from opscore.client.errors import OpsCoreError

SessionState = workflow_pb2.SessionState
RunState = workflow_pb2.TaskRunState
Ev = workflow_pb2.SessionEventType
FINAL = (
    SessionState.SESSION_STATE_COMPLETED,
    SessionState.SESSION_STATE_FAILED,
    SessionState.SESSION_STATE_CANCELLED,
)


def _state(value: int) -> str:
    return short_name(SessionState, value, "SESSION_STATE_")


@click.group()
def sessions() -> None:
    """Start, inspect, cancel and watch workflow sessions."""


@sessions.command("start")
@click.argument("definition_id")
@click.option("--version", type=int, default=0, help="Definition version (default: the latest).")
@click.option(
    "--input", "input_", metavar="JSON|@FILE", help="Session input: JSON object or @file."
)
@click.option("--agent", "agent_id", default="", help="Pin every task to this agent.")
@click.option(
    "--idempotency-key", help="Starting again with the same key returns the same session."
)
@click.option("--watch", is_flag=True, help="Follow it live; exit 1 unless it completes.")
@client_command
async def start(
    cli: Cli,
    definition_id: str,
    version: int,
    input_: str | None,
    agent_id: str,
    idempotency_key: str | None,
    watch: bool,
) -> int:
    """Start a session of workflow DEFINITION_ID (or a unique start of it)."""
    payload = parse_payload(input_)
    definition_id = (await ids.definition(cli.client, definition_id, version)).id
    resp = await cli.client.start_workflow_response(
        definition_id,
        version=version,
        input=payload,
        agent_id=await ids.agent_filter(cli.client, agent_id),
        idempotency_key=idempotency_key,
    )
    session = resp.session
    if resp.created:
        what = (
            f"started session {session.session_id} of {session.definition_id} "
            f"version {session.definition_version}"
        )
    else:
        what = (
            f"returned the existing session {session.session_id} of {session.definition_id} "
            f"version {session.definition_version} ({_state(session.state)}): idempotency key "
            f"{session.idempotency_key!r} was used before, so nothing new was started (the "
            "input is that of the first call)"
        )
    if cli.as_json:
        cli.print_json(message_json(session), compact=watch)
        if not resp.created:
            cli.warn(what)
    else:
        cli.print(what)
    if not watch:
        return 0
    return await follow(cli, session.session_id)


@sessions.command("watch")
@click.argument("session_id")
@client_command
async def watch(cli: Cli, session_id: str) -> int:
    """Follow a session until it ends (exit 1 unless it completes).

    A session that already ended is replayed from its first event. When the
    server restarts or the connection drops, the watch resumes after the last
    event shown (nothing is lost or shown twice), for as long as it runs.
    """
    return await follow(cli, (await ids.session(cli.client, session_id)).session_id)


@sessions.command("get")
@click.argument("session_id")
@client_command
async def get(cli: Cli, session_id: str) -> int:
    """Show a session (SESSION_ID or a unique start of it) and its task runs."""
    s = await ids.session(cli.client, session_id)
    if cli.as_json:
        cli.print_json(message_json(s))
    else:
        _show(cli, s)
    return 0


@sessions.command("list")
@click.option("--state", type=state_choice(SessionState, "SESSION_STATE_"), help="Only this state.")
@click.option("--definition", "definition_id", default="", help="Only sessions of this workflow.")
@limit_option(50)
@client_command
async def list_sessions(cli: Cli, state: str | None, definition_id: str, limit: int) -> None:
    """List sessions, newest first (ids shortened: any unique start of an id
    works wherever an id is taken)."""
    found, more = await take(
        cli.client.iter_sessions(state=state, definition_id=definition_id), limit
    )
    if cli.as_json:
        cli.print_json([message_json(s) for s in found])
    elif not found:
        cli.print("No sessions.")
    else:
        t = table("SESSION", "WORKFLOW", "STATE", "STARTED", "FINISHED")
        now = datetime.now(UTC)
        for s in found:
            t.add_row(
                ids.short_id(s.session_id),
                f"{s.definition_id} v{s.definition_version}",
                styled(_state(s.state)),
                age(s, "create_time", now),
                age(s, "finish_time", now),
            )
        cli.print(t)
    if more:
        cli.more_results(len(found), "sessions")


@sessions.command("cancel")
@click.argument("session_id")
@click.option("--reason", default="", help="Passed to agents holding the session's tasks.")
@client_command
async def cancel(cli: Cli, session_id: str, reason: str) -> None:
    """Cancel a session (SESSION_ID or a unique start of it): its queued tasks end
    and running ones are told to stop."""
    before = await ids.session(cli.client, session_id)
    s = await cli.client.cancel_session(before.session_id, reason)
    if cli.as_json:
        cli.print_json(message_json(s))
    elif before.state == SessionState.SESSION_STATE_CANCELLED:
        cli.print(f"session {s.session_id} was already cancelled")
    else:
        cli.print(f"cancelled session {s.session_id} ({_state(s.state)}): {s.error.message}")


# ---------------------------------------------------------------------- showing


# The words of the task filters: TaskRunState names, and while a run is RUNNING
# the state of its dispatch task (`opscore tasks list --state ...`).
RUN_STATE_NAMES = {
    RunState.TASK_RUN_STATE_WAITING: "waiting",
    RunState.TASK_RUN_STATE_RUNNING: "running",
    RunState.TASK_RUN_STATE_COMPLETED: "completed",
    RunState.TASK_RUN_STATE_FAILED: "failed",
    RunState.TASK_RUN_STATE_CANCELLED: "cancelled",
    RunState.TASK_RUN_STATE_REPLACED: "replaced",
    RunState.TASK_RUN_STATE_SKIPPED: "skipped",
}
RUN_STYLES = {
    "waiting": "dim",
    "queued": "yellow",
    "scheduled": "yellow",
    "assigned": "cyan",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
    "replaced": "red dim",
    "skipped": "dim",
}
#: Summary order; the first three count as finished on the progress bar.
FINISHED_RUN_STATES = ("completed", "replaced", "skipped")
SUMMARY_ORDER = (
    *FINISHED_RUN_STATES,
    "assigned",
    "scheduled",
    "queued",
    "running",
    "waiting",
    "failed",
    "cancelled",
)


def _run_state_text(run: workflow_pb2.TaskRun) -> str:
    return RUN_STATE_NAMES.get(run.state, "?")


def _show(cli: Cli, s: workflow_pb2.Session) -> None:
    rows: list[tuple[str, object]] = [
        ("session id", s.session_id),
        ("workflow", f"{s.definition_id} version {s.definition_version}"),
        ("state", styled(_state(s.state))),
        ("started", timestamp(s, "create_time")),
    ]
    if s.HasField("finish_time"):
        rows.append(("finished", timestamp(s, "finish_time")))
    if s.agent_id:
        rows.append(("pinned to", s.agent_id))
    rows.append(("input", pretty(to_dict(s.input))))
    if s.HasField("output"):
        rows.append(("output", pretty(to_dict(s.output))))
    if s.HasField("error") and s.state == SessionState.SESSION_STATE_CANCELLED:
        rows.append(("cancelled", s.error.message))  # CancelSession's reason
    elif s.HasField("error"):
        rows.append(("error", f"{s.error.type or 'Error'}: {s.error.message}"))
    cli.print(details_table(rows))
    if s.task_runs:
        t = table("STEP", "STATE", "TRY", "TASK", "RESULT")
        for run in s.task_runs:
            name = _run_state_text(run)
            result = ""
            if run.HasField("output"):
                result = compact_json(to_dict(run.output), 60)
            elif run.HasField("error"):
                result = f"{run.error.type or 'Error'}: {run.error.message}"
            t.add_row(
                run.workflow_task_id,
                Text(name, style=RUN_STYLES.get(name, "")),
                str(run.attempt or "-"),
                ids.short_id(run.task_id) if run.task_id else "-",
                result,
            )
        cli.print()
        cli.print(t)


@dataclass
class _Run:
    task_id: str
    state: str = "waiting"
    attempt: int = 0
    agent: str = ""
    note: str = ""
    since: datetime | None = None


@dataclass
class SessionView:
    """What a watcher knows of a session, kept up to date from its events."""

    session: workflow_pb2.Session
    runs: dict[str, _Run] = field(default_factory=dict)
    state: int = 0
    last_event: datetime | None = None

    def __post_init__(self) -> None:
        # Events replay the whole story, so every task starts out waiting.
        for run in self.session.task_runs:
            self.runs[run.workflow_task_id] = _Run(task_id=run.task_id)
        self.state = SessionState.SESSION_STATE_PENDING

    @property
    def started(self) -> datetime | None:
        return to_datetime(self.session, "create_time")

    def apply(self, e: workflow_pb2.SessionEvent) -> str:
        """Update from one event; return a one-line description of it."""
        self.state = e.session_state or self.state
        when = to_datetime(e, "event_time")
        self.last_event = when
        run = (
            self.runs.setdefault(e.workflow_task_id, _Run(task_id=e.task_id))
            if e.workflow_task_id
            else None
        )
        t = e.event_type
        if run is not None:
            run.task_id = e.task_id or run.task_id
            run.attempt = e.attempt or run.attempt
            run.since = when
        if t == Ev.SESSION_EVENT_TYPE_SESSION_STARTED:
            return "session started"
        if run is None:
            what = short_name(Ev, t, "SESSION_EVENT_TYPE_").lower().replace("_", " ")
            if e.HasField("error") and e.error.message:
                what += f": {e.error.message}"
            return what
        tid = e.workflow_task_id
        if t == Ev.SESSION_EVENT_TYPE_TASK_QUEUED:
            run.state, run.note = "queued", ""
            return f"{tid} queued"
        if t == Ev.SESSION_EVENT_TYPE_FALLBACK_STARTED:
            run.state, run.note = "queued", "fallback"
            return f"{tid} queued as a fallback"
        if t == Ev.SESSION_EVENT_TYPE_TASK_ASSIGNED:
            run.state, run.agent, run.note = "assigned", e.agent_id, ""
            return f"{tid} assigned to {e.agent_id} (attempt {e.attempt})"
        if t == Ev.SESSION_EVENT_TYPE_TASK_RETRYING:
            run.state, run.note = "scheduled", f"retry: {e.error.message}"
            return f"{tid} attempt {e.attempt} failed, scheduled for a retry: {e.error.message}"
        if t == Ev.SESSION_EVENT_TYPE_TASK_COMPLETED:
            run.state = "completed"
            run.note = compact_json(to_dict(e.output), 60) if e.HasField("output") else ""
            return f"{tid} completed" + (f": {run.note}" if run.note else "")
        if t == Ev.SESSION_EVENT_TYPE_TASK_FAILED:
            run.state, run.note = "failed", f"{e.error.type or 'Error'}: {e.error.message}"
            return f"{tid} failed: {run.note}"
        if t == Ev.SESSION_EVENT_TYPE_TASK_CANCELLED:
            run.state, run.note = "cancelled", e.error.message
            return f"{tid} cancelled" + (f": {e.error.message}" if e.error.message else "")
        return f"{tid} {short_name(Ev, t, 'SESSION_EVENT_TYPE_').lower()}"

    def finish(self, final: workflow_pb2.Session) -> None:
        """Take the authoritative final states (replaced, skipped...)."""
        self.session = final
        self.state = final.state
        for run in final.task_runs:
            view = self.runs.setdefault(run.workflow_task_id, _Run(task_id=run.task_id))
            view.state = _run_state_text(run)
            if view.state == "running":  # RUNNING in a final session cannot be
                view.state = "cancelled"

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run.state] = counts.get(run.state, 0) + 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        order = [*SUMMARY_ORDER, *sorted(set(counts) - set(SUMMARY_ORDER))]
        return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))

    def finished(self) -> int:
        return sum(1 for r in self.runs.values() if r.state in FINISHED_RUN_STATES)

    def __rich__(self) -> RenderableType:
        now = datetime.now(UTC)
        header = Text()
        header.append(f"session {self.session.session_id} ", style="bold")
        header.append(f"{self.session.definition_id} v{self.session.definition_version}  ")
        header.append(_state(self.state), style=STATE_STYLE.get(self.state, ""))
        started = self.started
        if started is not None:
            end = to_datetime(self.session, "finish_time") or now
            header.append(f"  {max(0.0, (end - started).total_seconds()):.1f}s", style="dim")
        done = self.finished()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(1, len(self.runs)), completed=done, width=30),
            Text(f"{done}/{len(self.runs)} tasks finished: {self.summary()}"),
        )
        t = table("STEP", "STATE", "TRY", "AGENT", "FOR", "NOTE")
        final = self.state in FINAL
        for tid, run in self.runs.items():
            elapsed = ""
            if (
                run.since is not None
                and run.state in ("queued", "assigned", "scheduled")
                and not final
            ):
                elapsed = f"{max(0.0, (now - run.since).total_seconds()):.1f}s"
            t.add_row(
                tid,
                Text(run.state, style=RUN_STYLES.get(run.state, "")),
                str(run.attempt or "-"),
                run.agent or "-",
                elapsed,
                run.note,
            )
        return Group(header, bar, t)


STATE_STYLE: dict[int, str] = {
    SessionState.SESSION_STATE_PENDING: "yellow",
    SessionState.SESSION_STATE_RUNNING: "cyan",
    SessionState.SESSION_STATE_COMPLETED: "green",
    SessionState.SESSION_STATE_FAILED: "red",
    SessionState.SESSION_STATE_CANCELLED: "magenta",
}


#: A task queued this long makes the watcher check whether anyone can take it.
COVERAGE_GRACE = 1.0
COVERAGE_EVERY = 5.0


async def _point_out_stuck(cli: Cli, view: SessionView, report: Callable[[str], None]) -> None:
    """While watching: say once per task when it sits queued and no connected
    agent could take it (and again if the reason changes)."""
    said: dict[str, str] = {}
    await asyncio.sleep(COVERAGE_GRACE)
    while True:
        now = datetime.now(UTC)
        for tid, run in list(view.runs.items()):
            if run.state != "queued" or not run.task_id or run.since is None:
                continue
            if (now - run.since).total_seconds() < COVERAGE_GRACE:
                continue
            problem = await nobody_for_task(cli.client, await cli.client.get_task(run.task_id))
            if problem is None or said.get(tid) == problem:
                continue
            said[tid] = problem
            if run.state == "queued":
                run.note = problem
                report(f"{tid} is waiting: {problem}")
        await asyncio.sleep(COVERAGE_EVERY)


@contextlib.asynccontextmanager
async def _watching(
    cli: Cli, view: SessionView, report: Callable[[str], None]
) -> AsyncIterator[None]:
    checker = asyncio.create_task(_point_out_stuck(cli, view, report))
    try:
        with watch_notes(cli, logging.getLogger("opscore.client")):
            yield
    finally:
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError, OpsCoreError):
            await checker


async def follow(cli: Cli, session_id: str) -> int:
    """Watch a session to its end; 0 if it completed, 1 otherwise."""
    client = cli.client
    view = SessionView(await client.get_session(session_id))
    if cli.as_json:
        async with _watching(cli, view, cli.warn):
            async for e in client.watch_session(session_id):
                view.apply(e)
                cli.print_json(message_json(e), compact=True)
        final = await client.get_session(session_id)
        cli.print_json(message_json(final), compact=True)
        return 0 if final.state == SessionState.SESSION_STATE_COMPLETED else EXIT_FAILED
    if cli.out.is_terminal:
        with Live(view, console=cli.out, refresh_per_second=8, transient=False) as live:
            async with _watching(cli, view, lambda _: live.refresh()):
                async for e in client.watch_session(session_id):
                    view.apply(e)
                    live.refresh()
            final = await client.get_session(session_id)
            view.finish(final)
            live.refresh()
    else:
        started = view.started

        def line(text: str, when: datetime | None = None) -> None:
            when = when or datetime.now(UTC)
            offset = (when - started).total_seconds() if started else 0.0
            cli.print(f"+{offset:6.2f}s  {text}")

        async with _watching(cli, view, line):
            async for e in client.watch_session(session_id):
                line(view.apply(e), to_datetime(e, "event_time"))
        final = await client.get_session(session_id)
        view.finish(final)
    _conclude(cli, final)
    return 0 if final.state == SessionState.SESSION_STATE_COMPLETED else EXIT_FAILED


def _conclude(cli: Cli, s: workflow_pb2.Session) -> None:
    started, finished = to_datetime(s, "create_time"), to_datetime(s, "finish_time")
    took = f" in {(finished - started).total_seconds():.1f}s" if started and finished else ""
    line = Text(f"session {s.session_id} ")
    line.append(_state(s.state), style=STATE_STYLE.get(s.state, ""))
    line.append(took)
    cli.print(line)
    if s.HasField("output"):
        cli.print(pretty(to_dict(s.output)))
    if s.HasField("error"):
        cli.print(Text(f"{s.error.type or 'Error'}: {s.error.message}", style="red"))
