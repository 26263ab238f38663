"""Is anyone there to run it? A task waits in QUEUED, silently, while no connected
agent can take it; the CLI says so.

An agent takes a task when it holds an open task stream (`open_subscriptions`),
is IDLE or ACTIVE, and has the task's capability (or the task is pinned to it).
The check lists the agents with that capability (ListAgents(capability=...)).
It cannot see that a stream was narrowed to fewer capabilities, nor that the
eligible agents are merely busy: it only reports when nobody could take the
task at all.
"""

from __future__ import annotations

from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2

from opscore.client import OpsCoreClient
from opscore.client.errors import NotFoundError

AgentState = lifecycle_pb2.AgentState
_TAKES_WORK = (AgentState.AGENT_STATE_IDLE, AgentState.AGENT_STATE_ACTIVE)
#: Agents listed to check a capability (a fleet larger than this is not scanned).
MAX_AGENTS_CHECKED = 1000


def _state(agent: lifecycle_pb2.Agent) -> str:
    return str(AgentState.Name(agent.state)).removeprefix("AGENT_STATE_")


async def nobody_for(client: OpsCoreClient, capability: str, agent_id: str = "") -> str | None:
    """Why no connected agent could take a task needing `capability` (or pinned
    to `agent_id`), or None when one could."""
    if agent_id:
        try:
            a = await client.get_agent(agent_id)
        except NotFoundError:
            return f"agent {agent_id} is not registered"
        if a.deregistered:
            return f"agent {agent_id} is deregistered"
        if not a.open_subscriptions:
            return f"agent {agent_id} is not connected (no open task stream)"
        if a.state not in _TAKES_WORK:
            return f"agent {agent_id} is {_state(a)} and gets no tasks until it reports IDLE"
        return None
    found = [
        a
        async for a in client.iter_agents(
            capability=capability, limit=MAX_AGENTS_CHECKED, page_size=MAX_AGENTS_CHECKED
        )
        if not a.deregistered
    ]
    if any(a.open_subscriptions and a.state in _TAKES_WORK for a in found):
        return None
    if not found:
        return f"no agent has capability {capability}"
    connected = [a for a in found if a.open_subscriptions]
    if not connected:
        return (
            f"no connected agent has capability {capability} "
            f"({len(found)} registered, none with an open task stream)"
        )
    states = ", ".join(sorted({_state(a) for a in connected}))
    return f"no agent with capability {capability} takes work: the connected ones are {states}"


async def nobody_for_task(client: OpsCoreClient, task: dispatch_pb2.Task) -> str | None:
    """`nobody_for` a QUEUED task; None for a task in any other state."""
    if task.state != dispatch_pb2.TaskState.TASK_STATE_QUEUED:
        return None
    # A pinned workflow task keeps its step's capability as information only.
    if task.agent_id:
        return await nobody_for(client, "", task.agent_id)
    return await nobody_for(client, task.capability)
