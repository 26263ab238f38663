"""`opscore agents ...`: list, inspect, watch and deregister agents."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import click
from opscore_proto.v1 import lifecycle_pb2

from opscore.cli import ids
from opscore.cli.common import (
    Cli,
    age,
    client_command,
    compact_json,
    details_table,
    limit_option,
    message_json,
    pretty,
    short_name,
    state_choice,
    styled,
    table,
    take,
    timestamp,
    watch_notes,
)
from opscore.client import to_datetime, to_dict

AgentState = lifecycle_pb2.AgentState
EventType = lifecycle_pb2.AgentEventType


def _state(value: int) -> str:
    return short_name(AgentState, value, "AGENT_STATE_")


@click.group()
def agents() -> None:
    """Inspect, watch and deregister agents."""


@agents.command("list")
@click.option("--state", type=state_choice(AgentState, "AGENT_STATE_"), help="Only this state.")
@click.option("--capability", default="", help="Only agents with this capability.")
@limit_option(100)
@client_command
async def list_agents(cli: Cli, state: str | None, capability: str, limit: int) -> None:
    """List agents, ordered by id."""
    found, more = await take(cli.client.iter_agents(state=state, capability=capability), limit)
    if cli.as_json:
        cli.print_json([message_json(a) for a in found])
    elif not found:
        cli.print("No agents.")
    else:
        t = table("AGENT ID", "NAME", "STATE", "CAPABILITIES", "STREAMS", "LAST SEEN")
        now = datetime.now(UTC)
        for a in found:
            state_text = styled(_state(a.state))
            if a.deregistered:
                state_text.append(" (deregistered)", style="dim")
            t.add_row(
                a.agent_id,
                a.name or "-",
                state_text,
                ", ".join(a.capabilities) or "-",
                str(a.open_subscriptions),
                "live" if a.open_subscriptions else age(a, "last_seen_time", now),
            )
        cli.print(t)
    if more:
        cli.more_results(len(found), "agents")


@agents.command("get")
@click.argument("agent_id")
@client_command
async def get_agent(cli: Cli, agent_id: str) -> None:
    """Show one agent (AGENT_ID or a unique start of it)."""
    a = await ids.agent(cli.client, agent_id)
    if cli.as_json:
        cli.print_json(message_json(a))
        return
    cli.print(
        details_table(
            [
                ("agent id", a.agent_id),
                ("name", a.name or "-"),
                ("version", a.version or "-"),
                ("state", styled(_state(a.state))),
                ("state details", pretty(to_dict(a.state_details))),
                ("since", timestamp(a, "state_change_time")),
                ("capabilities", ", ".join(a.capabilities) or "-"),
                ("open streams", a.open_subscriptions),
                ("last seen", timestamp(a, "last_seen_time")),
                ("registered", timestamp(a, "register_time")),
                ("deregistered", "yes" if a.deregistered else "no"),
                ("contact", a.contact_endpoint or "-"),
                ("metadata", pretty(dict(a.metadata))),
            ]
        )
    )


@agents.command("history")
@click.argument("agent_id")
@limit_option(50)
@client_command
async def history(cli: Cli, agent_id: str, limit: int) -> None:
    """Show an agent's state transitions, newest first."""
    agent_id = (await ids.agent(cli.client, agent_id)).agent_id
    found, more = await take(cli.client.iter_state_transitions(agent_id), limit)
    if cli.as_json:
        cli.print_json([message_json(t) for t in found])
    else:
        t = table("#", "OBSERVED", "FROM", "TO", "BY", "DETAILS")
        for tr in found:
            to_state = styled(_state(tr.to_state))
            if tr.out_of_order:
                to_state.append(" (out of order)", style="dim")
            t.add_row(
                str(tr.sequence),
                timestamp(tr, "observe_time"),
                _state(tr.from_state) if tr.from_state else "-",
                to_state,
                tr.source,
                compact_json(to_dict(tr.details)) if tr.HasField("details") else "",
            )
        cli.print(t)
    if more:
        cli.more_results(len(found), "transitions")


@agents.command("deregister")
@click.argument("agent_id")
@client_command
async def deregister(cli: Cli, agent_id: str) -> None:
    """Remove an agent from dispatch: its task streams end, the tasks it holds are
    retried elsewhere, its record and history are kept (FINISHED, deregistered).
    Registering again with the same id brings it back."""
    agent_id = (await ids.agent(cli.client, agent_id)).agent_id
    a = await cli.client.deregister_agent(agent_id)
    if cli.as_json:
        cli.print_json(message_json(a))
    else:
        cli.print(f"deregistered agent {a.agent_id} ({_state(a.state)})")


@agents.command("watch")
@click.option("--agent", "agent_ids", multiple=True, help="Only this agent (repeatable).")
@click.option("--capability", default="", help="Only agents with this capability.")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=state_choice(EventType, "AGENT_EVENT_TYPE_"),
    help="Only this kind of event (repeatable).",
)
@client_command
async def watch(
    cli: Cli, agent_ids: tuple[str, ...], capability: str, events: tuple[str, ...]
) -> None:
    """Print agent events as they happen, until Ctrl-C.

    When the server restarts or the connection drops, it reconnects with
    backoff for as long as it runs, then replays the state changes it missed
    from the agents' histories (no event is shown twice).
    """
    if not cli.as_json:
        cli.err.print(f"watching agent events on {cli.target} (Ctrl-C to stop)", style="dim")
    with watch_notes(cli, logging.getLogger("opscore.client")):
        async for e in cli.client.watch_agents(
            agent_ids=agent_ids, capability=capability, event_types=events, reconnect=True
        ):
            if cli.as_json:
                cli.print_json(message_json(e), compact=True)
                continue
            when = to_datetime(e, "event_time")
            kind = short_name(EventType, e.event_type, "AGENT_EVENT_TYPE_")
            line = f"{when:%H:%M:%S} " if when else ""
            change = ""
            if e.HasField("transition"):
                tr = e.transition
                change = (
                    f" {_state(tr.from_state) if tr.from_state else '-'} → {_state(tr.to_state)}"
                )
                if tr.out_of_order:
                    change += " (out of order)"
            cli.print(f"{line}{kind:<14} {e.agent.agent_id}{change}")
