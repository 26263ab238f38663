"""Resuming an agent watch after a reconnect, without losing or repeating events.

WatchAgents carries only events that happen while the stream is open, and has no
`after_sequence` like WatchSession. What happened in the gap is still in the
server's records: each agent's history (`ListStateTransitions`, numbered by
`sequence`) and its current snapshot (`ListAgents`). So after a reconnect, once
the new stream is registered (its initial metadata arrived), the watcher lists
the agents, and for each one whose state moved on since it last saw it, replays
the transitions it missed as events. Live events already replayed that way
(same agent, same transition sequence) are then dropped.

What cannot be recovered: an UPDATED event (re-registration with new details)
in the gap, and the agent snapshot as it was at each missed transition (replayed
events carry the agent as it is now).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from opscore_proto.v1 import lifecycle_pb2

Event = lifecycle_pb2.WatchAgentsResponse
EventType = lifecycle_pb2.AgentEventType
AgentState = lifecycle_pb2.AgentState

#: At most this many missed transitions are replayed per agent and reconnect.
MAX_REPLAYED_PER_AGENT = 100


class _Lister(Protocol):
    def iter_agents(self, *, capability: str = "") -> AsyncIterator[lifecycle_pb2.Agent]: ...

    def iter_state_transitions(
        self, agent_id: str
    ) -> AsyncIterator[lifecycle_pb2.StateTransition]: ...


def _kind(t: lifecycle_pb2.StateTransition, agent: lifecycle_pb2.Agent) -> int:
    """The event a recorded transition was announced as."""
    if t.to_state == AgentState.AGENT_STATE_INITIALIZING and t.source == "server":
        return EventType.AGENT_EVENT_TYPE_REGISTERED
    if t.to_state == AgentState.AGENT_STATE_OFFLINE:
        return EventType.AGENT_EVENT_TYPE_OFFLINE
    if t.to_state == AgentState.AGENT_STATE_FINISHED and t.source == "server":
        return EventType.AGENT_EVENT_TYPE_DEREGISTERED
    return EventType.AGENT_EVENT_TYPE_STATE_CHANGED


@dataclass
class AgentWatchState:
    """What one watch has seen: per agent, the last transition sequence and
    snapshot. `accept` filters live events; `replay` fills a gap."""

    agent_ids: Collection[str]
    capability: str
    event_types: Collection[int]
    _sequence: dict[str, int] = field(default_factory=dict)
    _seen: dict[str, lifecycle_pb2.Agent] = field(default_factory=dict)
    _last_event_time: int = 0  # microseconds, server clock

    def _wanted(self, kind: int) -> bool:
        return not self.event_types or kind in self.event_types

    def accept(self, event: Event) -> bool:
        """Record a live event; False when a replay already delivered it."""
        agent_id = event.agent.agent_id
        repeat = False
        # Every event but UPDATED carries the transition it recorded.
        if event.HasField("transition"):
            seq = event.transition.sequence
            repeat = seq <= self._sequence.get(agent_id, 0)
            self._sequence[agent_id] = max(seq, self._sequence.get(agent_id, 0))
        self._seen[agent_id] = event.agent
        if event.HasField("event_time"):
            self._last_event_time = max(self._last_event_time, event.event_time.ToMicroseconds())
        return not repeat

    def watching_since(self, micros: int) -> None:
        """The server-clock time the first stream opened (no event seen yet)."""
        if not self._last_event_time:
            self._last_event_time = micros

    async def replay(self, client: _Lister, now: Callable[[], int]) -> list[Event]:
        """The events missed since the last one seen, oldest first per agent."""
        since = self._last_event_time or now()
        out: list[Event] = []
        async for agent in client.iter_agents(capability=self.capability):
            agent_id = agent.agent_id
            if self.agent_ids and agent_id not in self.agent_ids:
                continue
            before = self._seen.get(agent_id)
            if before is not None and (
                before.state == agent.state
                and before.state_change_time == agent.state_change_time
                and before.deregistered == agent.deregistered
            ):
                continue
            known = self._sequence.get(agent_id)
            missed: list[lifecycle_pb2.StateTransition] = []
            async for t in client.iter_state_transitions(agent_id):  # newest first
                if known is not None and t.sequence <= known:
                    break
                if known is None and t.record_time.ToMicroseconds() < since:
                    break
                missed.append(t)
                if len(missed) >= MAX_REPLAYED_PER_AGENT:
                    break
            self._seen[agent_id] = agent
            for t in reversed(missed):
                self._sequence[agent_id] = max(t.sequence, self._sequence.get(agent_id, 0))
                kind = _kind(t, agent)
                if self._wanted(kind):
                    out.append(
                        Event(
                            event_type=kind,  # type: ignore[arg-type]
                            agent=agent,
                            transition=t,
                            event_time=t.record_time,
                        )
                    )
        return out
