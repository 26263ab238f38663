"""`opscore workflows ...`: workflow definitions."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from opscore.cli import ids
from opscore.cli.common import (
    Cli,
    age,
    client_command,
    compact_json,
    details_table,
    limit_option,
    message_json,
    table,
    take,
    timestamp,
)
from opscore.client import to_dict, to_timedelta


@click.group()
def workflows() -> None:
    """Store, inspect and delete workflow definitions."""


@workflows.command("create")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    metavar="FILE",
    help="Definition in YAML or JSON (proto field names, or the earlier Ops-Core "
    "format); - for stdin.",
)
@client_command
async def create(cli: Cli, path: str) -> None:
    """Store a workflow definition from a file.

    Definitions are immutable per (id, version): storing the same content again
    is a no-op, and a definition without a version becomes the next version.
    """
    source = _read(path)
    resp = await cli.client.create_workflow_definition_response(source=source)
    definition = resp.definition
    tasks = f"{len(definition.tasks)} task{'s' if len(definition.tasks) != 1 else ''}"
    if resp.created:
        what = f"stored workflow {definition.id} version {definition.version} ({tasks})"
    else:
        what = (
            f"unchanged: workflow {definition.id} version {definition.version} ({tasks}) "
            "was already stored with this content"
        )
    if cli.as_json:
        cli.print_json(message_json(definition))
        if not resp.created:
            cli.warn(what)
    else:
        cli.print(what)


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None


@workflows.command("list")
@limit_option(100)
@client_command
async def list_definitions(cli: Cli, limit: int) -> None:
    """List definitions (the latest version of each)."""
    found, more = await take(cli.client.iter_workflow_definitions(), limit)
    if cli.as_json:
        cli.print_json([message_json(d) for d in found])
    elif not found:
        cli.print("No workflow definitions.")
    else:
        t = table("ID", "VERSION", "NAME", "TASKS", "CREATED")
        now = datetime.now(UTC)
        for d in found:
            t.add_row(
                d.id, str(d.version), d.name or "-", str(len(d.tasks)), age(d, "create_time", now)
            )
        cli.print(t)
    if more:
        cli.more_results(len(found), "workflow definitions")


@workflows.command("get")
@click.argument("definition_id")
@click.option("--version", type=int, default=0, help="This version (default: the latest).")
@client_command
async def get(cli: Cli, definition_id: str, version: int) -> None:
    """Show a definition (DEFINITION_ID or a unique start of it) and its tasks."""
    d = await ids.definition(cli.client, definition_id, version)
    if cli.as_json:
        cli.print_json(message_json(d))
        return
    cli.print(
        details_table(
            [
                ("id", d.id),
                ("version", d.version),
                ("name", d.name or "-"),
                ("description", d.description or "-"),
                ("created", timestamp(d, "create_time")),
            ]
        )
    )
    t = table("TASK", "RUNS ON", "DEPENDS ON", "FALLBACK", "TIMEOUT", "PARAMETERS")
    for task in d.tasks:
        timeout = to_timedelta(task, "timeout")
        t.add_row(
            task.id,
            task.capability or f"agent {task.agent_id}",
            ", ".join(task.depends_on) or "-",
            task.fallback or "-",
            f"{timeout.total_seconds():g}s" if timeout else "-",
            compact_json(to_dict(task.parameters)) if task.HasField("parameters") else "-",
        )
    cli.print()
    cli.print(t)


@workflows.command("delete")
@click.argument("definition_id")
@click.option("--version", type=int, default=0, help="Only this version (default: all).")
@client_command
async def delete(cli: Cli, definition_id: str, version: int) -> None:
    """Delete a definition (running sessions are not affected)."""
    definition_id = (await ids.definition(cli.client, definition_id, version)).id
    count = await cli.client.delete_workflow_definition(definition_id, version)
    if cli.as_json:
        cli.print_json({"definition_id": definition_id, "deleted_versions": count})
    else:
        cli.print(f"deleted {count} version{'s' if count != 1 else ''} of workflow {definition_id}")
