"""`opscore tasks ...`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import click
from opscore_proto.v1 import dispatch_pb2
from rich.text import Text

from opscore.cli import ids
from opscore.cli.common import (
    EXIT_FAILED,
    Cli,
    age,
    client_command,
    details_table,
    limit_option,
    message_json,
    parse_duration,
    parse_payload,
    pretty,
    short_name,
    state_choice,
    styled,
    table,
    take,
    timestamp,
)
from opscore.cli.coverage import nobody_for_task
from opscore.client import TaskRetry, to_datetime, to_dict, to_timedelta
from opscore.client.errors import UnimplementedError

TaskState = dispatch_pb2.TaskState
FINAL = (
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELLED,
)


def _state(value: int) -> str:
    return short_name(TaskState, value, "TASK_STATE_")


@click.group()
def tasks() -> None:
    """Queue, inspect and cancel standalone tasks."""


@tasks.command("enqueue")
@click.argument("capability", required=False)
@click.option(
    "--capability", "capability_option", metavar="CAPABILITY", help="Same as the argument."
)
@click.option("--agent", "agent_id", default="", help="Pin to this agent instead of a capability.")
@click.option("--input", "input_", metavar="JSON|@FILE", help="Task input: a JSON object or @file.")
@click.option("--name", default="", help="A name for people.")
@click.option("--priority", type=int, default=0, help="Higher runs first.")
@click.option("--delay", metavar="DURATION", help="Run no earlier than this from now (30s, 5m).")
@click.option("--timeout", metavar="DURATION", help="Maximum length of one attempt (default 300s).")
@click.option(
    "--heartbeat-timeout", metavar="DURATION", help="End an attempt without a heartbeat this long."
)
@click.option(
    "--max-attempts", type=int, default=0, help="Attempts including the first (default 3)."
)
@click.option("--idempotency-key", help="Enqueueing again with the same key returns the same task.")
@click.option(
    "--wait", is_flag=True, help="Wait until the task finishes; exit 1 unless it completed."
)
@client_command
async def enqueue(
    cli: Cli,
    capability: str | None,
    capability_option: str | None,
    agent_id: str,
    input_: str | None,
    name: str,
    priority: int,
    delay: str | None,
    timeout: str | None,
    heartbeat_timeout: str | None,
    max_attempts: int,
    idempotency_key: str | None,
    wait: bool,
) -> int:
    """Queue a task for any agent with CAPABILITY (or for --agent).

    The task is QUEUED at once (SCHEDULED with --delay). Without
    --idempotency-key a fresh key is generated, so a retry after a network
    error cannot queue it twice.
    """
    if capability and capability_option and capability != capability_option:
        raise click.UsageError("CAPABILITY and --capability differ")
    capability = capability or capability_option
    if bool(capability) == bool(agent_id):
        raise click.UsageError("give a CAPABILITY or --agent (exactly one)")
    resp = await cli.client.enqueue_task_response(
        capability or "",
        agent_id=await ids.agent_filter(cli.client, agent_id),
        input=parse_payload(input_),
        name=name,
        priority=priority,
        delay=parse_duration(delay, "--delay"),
        timeout=parse_duration(timeout, "--timeout"),
        heartbeat_timeout=parse_duration(heartbeat_timeout, "--heartbeat-timeout"),
        retry_policy=TaskRetry(max_attempts=max_attempts) if max_attempts else None,
        idempotency_key=idempotency_key,
    )
    task = resp.task
    if resp.created:
        what = f"queued task {task.task_id} ({_state(task.state)})"
    else:
        what = (
            f"returned the existing task {task.task_id} ({_state(task.state)}): idempotency "
            f"key {task.idempotency_key!r} was used before, so nothing new was queued "
            "(the input and options are those of the first call)"
        )
        if cli.as_json:
            cli.warn(what)
    if not wait:
        if cli.as_json:
            cli.print_json(message_json(task))
        else:
            cli.print(what)
        return 0
    if not cli.as_json:
        cli.err.print(f"{what}; waiting for it to finish", style="dim")
    task = await _wait(cli, task.task_id)
    if cli.as_json:
        cli.print_json(message_json(task))
    else:
        _show(cli, task)
    return 0 if task.state == TaskState.TASK_STATE_COMPLETED else EXIT_FAILED


#: How long a task may sit QUEUED before the CLI checks whether anyone can take it.
COVERAGE_GRACE = 1.0
COVERAGE_EVERY = 5.0


async def _wait(cli: Cli, task_id: str) -> dispatch_pb2.Task:
    """Poll the task until it is final (there is no task stream in the API),
    saying when no connected agent could take it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    checked = 0.0
    said: str | None = None
    delay = 0.05
    while True:
        task = await cli.client.get_task(task_id)
        if task.state in FINAL:
            return task
        now = loop.time()
        if now - started >= COVERAGE_GRACE and now - checked >= COVERAGE_EVERY:
            checked = now
            problem = await nobody_for_task(cli.client, task)
            if problem is not None and problem != said:
                cli.warn(f"task {task.task_id} is waiting: {problem}")
            elif problem is None and said is not None:
                cli.warn(f"task {task.task_id}: an agent that can take it is connected now")
            said = problem
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)


@tasks.command("list")
@click.option("--state", type=state_choice(TaskState, "TASK_STATE_"), help="Only this state.")
@click.option("--capability", default="", help="Only tasks needing this capability.")
@click.option("--agent", "agent_id", default="", help="Only tasks pinned or assigned to it.")
@click.option("--session", "session_id", default="", help="Only tasks of this workflow session.")
@limit_option(50)
@client_command
async def list_tasks(
    cli: Cli, state: str | None, capability: str, agent_id: str, session_id: str, limit: int
) -> None:
    """List tasks, newest first (ids shortened: any unique start of an id works
    wherever an id is taken)."""
    found, more = await take(
        cli.client.iter_tasks(
            state=state,
            capability=capability,
            agent_id=await ids.agent_filter(cli.client, agent_id),
            session_id=await ids.session_filter(cli.client, session_id),
        ),
        limit,
    )
    if cli.as_json:
        cli.print_json([message_json(t) for t in found])
    elif not found:
        cli.print("No tasks.")
    else:
        t = table("TASK", "NAME", "FOR", "STATE", "TRY", "AGENT", "CREATED")
        now = datetime.now(UTC)
        for task in found:
            t.add_row(
                ids.short_id(task.task_id),
                task.name or task.workflow_task_id or "-",
                _runs_on(task),
                styled(_state(task.state)),
                str(task.attempt),
                task.assigned_agent_id or "-",
                age(task, "create_time", now),
            )
        cli.print(t)
    if more:
        cli.more_results(len(found), "tasks")


def _runs_on(task: dispatch_pb2.Task) -> str:
    return f"agent {task.agent_id}" if task.agent_id else task.capability


@tasks.command("get")
@click.argument("task_id")
@client_command
async def get_task(cli: Cli, task_id: str) -> None:
    """Show one task (TASK_ID or a unique start of it) with its input, progress,
    output and last error; for a QUEUED task, whether any connected agent can
    take it; and its latest attempts with the traceback of the latest failed one."""
    task = await ids.task(cli.client, task_id)
    problem = await nobody_for_task(cli.client, task)
    if cli.as_json:
        cli.print_json(message_json(task))
        if problem is not None:
            cli.warn(f"task {task.task_id} is waiting: {problem}")
    else:
        _show(cli, task, problem)
        try:
            page = await cli.client.list_task_attempts(task.task_id, page_size=_ATTEMPTS_SHOWN)
        except UnimplementedError:
            return  # a server from before attempt history
        _show_attempts(cli, page.items, tracebacks=1)
        if page.next_page_token:
            cli.print(f"(older attempts: opscore tasks attempts {task.task_id})")


def _show(cli: Cli, task: dispatch_pb2.Task, waiting: str | None = None) -> None:
    policy = task.retry_policy
    rows: list[tuple[str, object]] = [
        ("task id", task.task_id),
        ("name", task.name or "-"),
        ("for", _runs_on(task)),
        ("state", styled(_state(task.state))),
        ("attempt", f"{task.attempt} of {policy.max_attempts}"),
        ("agent", task.assigned_agent_id or "-"),
        ("priority", task.priority),
        ("timeout", _duration(task, "timeout")),
        ("heartbeat timeout", _duration(task, "heartbeat_timeout")),
        ("created", timestamp(task, "create_time")),
    ]
    if waiting is not None:
        rows.append(("waiting", f"{waiting}: nobody can take it yet"))
    if task.HasField("schedule_time"):
        rows.append(("scheduled for", timestamp(task, "schedule_time")))
    if task.HasField("lease_expire_time"):
        rows.append(("lease ends", timestamp(task, "lease_expire_time")))
    if task.HasField("finish_time"):
        rows.append(("finished", timestamp(task, "finish_time")))
    if task.session_id:
        rows.append(("session", f"{task.session_id} (task {task.workflow_task_id})"))
    rows.append(("input", pretty(to_dict(task.input))))
    if task.HasField("progress"):
        rows.append(("progress", pretty(to_dict(task.progress))))
    if task.HasField("output"):
        rows.append(("output", pretty(to_dict(task.output))))
    if task.HasField("last_error") and _cancellation(task):
        rows.append(("cancelled", task.last_error.message))
    elif task.HasField("last_error"):
        err = task.last_error
        rows.append(("last error", f"{err.type or 'Error'}: {err.message}"))
        details: dict[str, Any] = to_dict(err.details)
        trace = details.pop("traceback", None)
        details.pop("exception_type", None)
        if details:
            rows.append(("error details", pretty(details)))
        if isinstance(trace, str) and trace:
            rows.append(("traceback", trace.rstrip()))
    cli.print(details_table(rows))


def _cancellation(task: dispatch_pb2.Task) -> bool:
    """A CANCELLED task's last_error is its cancellation's reason."""
    return task.state == TaskState.TASK_STATE_CANCELLED and task.last_error.type == "Cancelled"


def _duration(task: dispatch_pb2.Task, field_name: str) -> str:
    value = to_timedelta(task, field_name)
    return "-" if value is None else f"{value.total_seconds():g}s"


@tasks.command("cancel")
@click.argument("task_id")
@click.option("--reason", default="", help="Passed to the agent holding the task.")
@client_command
async def cancel(cli: Cli, task_id: str, reason: str) -> None:
    """Cancel a task (TASK_ID or a unique start of it) that has not finished."""
    before = await ids.task(cli.client, task_id)
    task = await cli.client.cancel_task(before.task_id, reason)
    if cli.as_json:
        cli.print_json(message_json(task))
    elif before.state == TaskState.TASK_STATE_CANCELLED:
        cli.print(f"task {task.task_id} was already cancelled")
    else:
        cli.print(f"cancelled task {task.task_id}: {task.last_error.message}")


# ---------------------------------------------------------------------- attempts

_ATTEMPTS_SHOWN = 10
TaskAttemptOutcome = dispatch_pb2.TaskAttemptOutcome


@tasks.command("attempts")
@click.argument("task_id")
@limit_option(100)
@client_command
async def attempts(cli: Cli, task_id: str, limit: int) -> None:
    """Every attempt of a task (TASK_ID or a unique start of it), newest first:
    agent, times, outcome, error, and the traceback of each failed one."""
    task = await ids.task(cli.client, task_id)
    found = [a async for a in cli.client.iter_task_attempts(task.task_id, limit=limit or None)]
    if cli.as_json:
        cli.print_json([message_json(a) for a in found])
    else:
        _show_attempts(cli, found, tracebacks=len(found))


def _show_attempts(cli: Cli, found: list[dispatch_pb2.TaskAttempt], *, tracebacks: int) -> None:
    """A table of `found` (newest first), then the tracebacks of the newest
    `tracebacks` failed attempts whose agent sent one."""
    if not found:
        return
    t = table("attempt", "agent", "outcome", "assigned", "ran", "error", title="attempts")
    for a in found:
        outcome = short_name(TaskAttemptOutcome, a.outcome, "TASK_ATTEMPT_OUTCOME_")
        err = f"{a.error.type or 'Error'}: {a.error.message}" if a.HasField("error") else "-"
        t.add_row(
            str(a.attempt),
            a.agent_id,
            styled(outcome),
            age(a, "assign_time"),
            _ran(a),
            err,
        )
    cli.print(t)
    shown = 0
    for a in found:
        if shown >= tracebacks:
            break
        trace = to_dict(a.error.details).get("traceback") if a.HasField("error") else None
        if isinstance(trace, str) and trace:
            shown += 1
            cli.print(Text(f"attempt {a.attempt} traceback ({a.agent_id}):", style="bold"))
            cli.print(Text(trace.rstrip()))


def _ran(a: dispatch_pb2.TaskAttempt) -> str:
    start = to_datetime(a, "assign_time")
    end = to_datetime(a, "end_time") or datetime.now(UTC)
    if start is None:
        return "-"
    return f"{(end - start).total_seconds():.3g}s"
