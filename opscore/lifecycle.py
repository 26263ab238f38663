"""Agent registry, state reports, history and liveness.

All agents live in memory (the registry is small and read on every dispatch
decision); every change is recorded in storage and acknowledged only after commit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from opscore import limits
from opscore import validation as v
from opscore.clock import utcnow
from opscore.errors import FailedPrecondition, InvalidArgument, NotFound, OpsCoreError
from opscore.events import Broadcast, Watcher
from opscore.models import (
    Agent,
    AgentEvent,
    AgentEventType,
    AgentState,
    Page,
    StateTransition,
)
from opscore.payload import Payload
from opscore.storage import Store
from opscore.storage.store import clamp_page_size, decode_cursor, encode_cursor

log = logging.getLogger("opscore.lifecycle")

# Called synchronously, before the commit, so reactions (ending task attempts) are
# part of the same transaction as the change that caused them.
AgentListener = Callable[[AgentEventType, Agent], None]


class LifecycleEngine:
    def __init__(
        self,
        store: Store,
        *,
        agent_timeout: timedelta = timedelta(seconds=30),
        encode_event: Callable[[AgentEvent], bytes] = lambda e: b"",
        response_budget: int = limits.DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
    ) -> None:
        self.store = store
        self.agent_timeout = agent_timeout
        self.response_budget = response_budget
        self.events: Broadcast[AgentEvent] = Broadcast(encode_event)
        self.listeners: list[AgentListener] = []
        self._clear()

    def _clear(self) -> None:
        self.agents: dict[str, Agent] = {}
        # Agent ids in order, so ListAgents pages by bisection instead of sorting.
        self._ids: list[str] = []
        self._liveness: dict[str, asyncio.TimerHandle] = {}

    def reset(self, error: OpsCoreError) -> None:
        """Forget every agent (memory may be ahead of the database) and end every
        watch with `error`; `start()` then reloads."""
        self.events.end_all(error)
        self.stop()
        self._clear()

    async def start(self) -> None:
        now = utcnow()
        agents = await self.store.load_agents()
        self._ids = sorted(a.agent_id for a in agents)
        for agent in agents:
            self.agents[agent.agent_id] = agent
            # Nobody could reach us while we were down: every agent gets a full
            # agent_timeout from now to reconnect before it is marked OFFLINE.
            agent.last_seen_time = max(agent.last_seen_time, now)
            self._arm_liveness(agent)

    def stop(self) -> None:
        for handle in self._liveness.values():
            handle.cancel()
        self._liveness.clear()

    # ------------------------------------------------------------------ queries

    def get(self, agent_id: str) -> Agent:
        v.require_id(agent_id, "agent_id")
        agent = self.agents.get(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} is not registered", reason="AGENT_NOT_FOUND")
        return agent

    def snapshot(self, agent: Agent) -> Agent:
        return dataclasses.replace(agent, metadata=dict(agent.metadata))

    def list(
        self, state: AgentState, capability: str, page_size: int, page_token: str
    ) -> Page[Agent]:
        """Ordered by id. Costs the agents it steps over, never a sort of all of them."""
        self._check_state(state, "state", allow_unspecified=True)
        limit = clamp_page_size(page_size)
        after = decode_cursor(page_token, str)[0] if page_token else ""
        page: list[Agent] = []
        used = 0
        more = False
        for agent_id in self._ids[bisect.bisect_right(self._ids, after) :]:
            a = self.agents[agent_id]
            if (state and a.state != state) or (capability and capability not in a.capabilities):
                continue
            size = _agent_size(a)
            if len(page) >= limit or (page and used + size > self.response_budget):
                more = True
                break
            used += size
            page.append(self.snapshot(a))
        token = encode_cursor(page[-1].agent_id) if more else ""
        return Page(page, token)

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str
    ) -> Page[StateTransition]:
        self.get(agent_id)
        items, token = await self.store.list_transitions(
            agent_id, page_size, page_token, self.response_budget
        )
        return Page(items, token)

    # ------------------------------------------------------------------ commands

    async def register(
        self,
        *,
        agent_id: str,
        name: str = "",
        version: str = "",
        capabilities: list[str] | tuple[str, ...] = (),
        contact_endpoint: str = "",
        metadata: dict[str, str] | None = None,
    ) -> tuple[Agent, bool]:
        if agent_id:
            v.require_id(agent_id, "agent_id")
        v.max_len(name, "name", limits.MAX_NAME_CHARS)
        v.max_len(version, "version", 64)
        v.max_len(contact_endpoint, "contact_endpoint", 1024)
        caps = v.capabilities(list(capabilities), "capabilities")
        meta = v.metadata(dict(metadata or {}))
        self.store.check_writable()
        with self.store.atomic():
            snap, created, event, transition, now = self._register(
                agent_id or str(uuid.uuid4()), name, version, caps, contact_endpoint, meta
            )
        await self.store.commit()
        self._publish(event, snap, transition, now)
        return snap, created

    def _register(
        self,
        agent_id: str,
        name: str,
        version: str,
        caps: tuple[str, ...],
        contact_endpoint: str,
        meta: dict[str, str],
    ) -> tuple[Agent, bool, AgentEventType, StateTransition | None, datetime]:
        now = utcnow()
        agent = self.agents.get(agent_id)
        created = agent is None
        if agent is None:
            agent = Agent(
                agent_id=agent_id,
                name=name,
                version=version,
                capabilities=caps,
                contact_endpoint=contact_endpoint,
                metadata=meta,
                state=AgentState.UNSPECIFIED,
                state_details=None,
                register_time=now,
                state_change_time=now,
                last_seen_time=now,
            )
            self.agents[agent_id] = agent
            bisect.insort(self._ids, agent_id)
            event = AgentEventType.REGISTERED
            transition = self._transition(agent, AgentState.INITIALIZING, None, now, "server")
        else:
            event = AgentEventType.REGISTERED if agent.deregistered else AgentEventType.UPDATED
            agent.name, agent.version, agent.capabilities = name, version, caps
            agent.contact_endpoint, agent.metadata = contact_endpoint, meta
            agent.last_seen_time = now
            transition = None
            if agent.deregistered:
                agent.deregistered = False
                transition = self._transition(agent, AgentState.INITIALIZING, None, now, "server")
        self.store.put_agent(agent)
        self._notify(event, agent)
        self._arm_liveness(agent)
        return self.snapshot(agent), created, event, transition, now

    async def deregister(self, agent_id: str) -> Agent:
        agent = self.get(agent_id)
        self.store.check_writable()
        now = utcnow()
        transition = None
        with self.store.atomic():
            if not agent.deregistered:
                agent.deregistered = True
                if agent.state != AgentState.FINISHED:
                    transition = self._transition(agent, AgentState.FINISHED, None, now, "server")
                self.store.put_agent(agent)
                self._notify(AgentEventType.DEREGISTERED, agent)
            snap = self.snapshot(agent)
        await self.store.commit()
        self._publish(AgentEventType.DEREGISTERED, snap, transition, now)
        return snap

    async def report_state(
        self,
        agent_id: str,
        state: int,
        details: Payload,
        observe_time: datetime | None,
        *,
        wait: bool = True,
    ) -> tuple[Agent, StateTransition]:
        """`state` is the raw enum number from the request; unknown values are refused."""
        agent = self.get(agent_id)
        state = self._check_state(state, "state")
        if state == AgentState.OFFLINE:
            raise InvalidArgument(
                "agents cannot report AGENT_STATE_OFFLINE; the server sets it when an agent "
                "stops being live",
                field="state",
            )
        v.payload_size(details, "details", v.MAX_DETAILS)
        if agent.deregistered:
            raise FailedPrecondition(
                f"agent {agent_id!r} is deregistered; register it again first",
                reason="AGENT_DEREGISTERED",
            )
        now = utcnow()
        if observe_time is not None and observe_time > now + limits.MAX_CLOCK_SKEW:
            # A report from the future would freeze the state for good: every later
            # report would look out of order.
            raise InvalidArgument(
                f"observe_time {observe_time.isoformat()} is more than "
                f"{int(limits.MAX_CLOCK_SKEW.total_seconds())} s ahead of the server clock "
                f"({now.isoformat()}); fix the agent's clock or leave observe_time unset",
                field="observe_time",
            )
        self.store.check_writable()
        observed = observe_time or now
        with self.store.atomic():
            agent.last_seen_time = now
            out_of_order = observed < agent.state_change_time
            transition = self._transition(agent, state, details, observed, "agent", out_of_order)
            self.store.put_agent(agent)
            if not out_of_order:
                self._notify(AgentEventType.STATE_CHANGED, agent)
            self._arm_liveness(agent)
            snap = self.snapshot(agent)
        if wait:
            await self.store.commit()
            self._publish(AgentEventType.STATE_CHANGED, snap, transition, now)
        else:
            self._publish_after_commit(AgentEventType.STATE_CHANGED, snap, transition, now)
        return snap, transition

    async def heartbeat(self, agent_id: str) -> Agent:
        agent = self.get(agent_id)
        self.store.check_writable()
        with self.store.atomic():
            self.touch(agent)
            snap = self.snapshot(agent)
        await self.store.commit()
        return snap

    # ------------------------------------------------------------------ liveness

    def touch(self, agent: Agent) -> None:
        """A sign of life from `agent` (any RPC naming it). Caller commits."""
        now = utcnow()
        agent.last_seen_time = now
        if agent.state == AgentState.OFFLINE and not agent.deregistered:
            back = agent.state_before_offline or AgentState.IDLE
            transition = self._transition(agent, back, None, now, "server")
            self._notify(AgentEventType.STATE_CHANGED, agent)
            self._publish_after_commit(AgentEventType.STATE_CHANGED, agent, transition, now)
            self.store.put_agent(agent)
        elif agent.open_subscriptions == 0:
            # With a stream open the agent is live regardless, so the hot path
            # (task results) does not rewrite the agent row on every call.
            self.store.put_agent(agent)
        self._arm_liveness(agent)

    def subscription_opened(self, agent: Agent) -> None:
        """Opening a subscription says the agent is ready. Caller commits."""
        agent.open_subscriptions += 1
        now = utcnow()
        agent.last_seen_time = now
        if agent.state in (AgentState.INITIALIZING, AgentState.OFFLINE, AgentState.UNSPECIFIED):
            transition = self._transition(agent, AgentState.IDLE, None, now, "server")
            self._publish_after_commit(AgentEventType.STATE_CHANGED, agent, transition, now)
            self._notify(AgentEventType.STATE_CHANGED, agent)
        self.store.put_agent(agent)

    def subscription_closed(self, agent: Agent) -> None:
        agent.open_subscriptions = max(0, agent.open_subscriptions - 1)
        agent.last_seen_time = utcnow()
        self.store.put_agent(agent)
        self._arm_liveness(agent)

    def is_live(self, agent: Agent, now: datetime | None = None) -> bool:
        if agent.open_subscriptions > 0:
            return True
        return (now or utcnow()) - agent.last_seen_time < self.agent_timeout

    def _arm_liveness(self, agent: Agent) -> None:
        if agent.agent_id in self._liveness or agent.open_subscriptions > 0:
            return
        if agent.deregistered or agent.state in (AgentState.OFFLINE, AgentState.FINISHED):
            return
        loop = asyncio.get_running_loop()
        delay = (agent.last_seen_time + self.agent_timeout - utcnow()).total_seconds()
        self._liveness[agent.agent_id] = loop.call_later(
            max(0.0, delay), self._liveness_due, agent.agent_id
        )

    def _liveness_due(self, agent_id: str) -> None:
        # A timer has no caller: a failure half-way rebuilds state (atomic, which
        # logs it); the event loop must not see it.
        with contextlib.suppress(Exception), self.store.atomic():
            self._mark_offline_if_silent(agent_id)

    def _mark_offline_if_silent(self, agent_id: str) -> None:
        self._liveness.pop(agent_id, None)
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        now = utcnow()
        if agent.open_subscriptions > 0 or self.is_live(agent, now):
            # Seen since the timer was set: wait for the new deadline.
            self._arm_liveness(agent)
            return
        if agent.deregistered or agent.state in (AgentState.OFFLINE, AgentState.FINISHED):
            return
        agent.state_before_offline = agent.state
        transition = self._transition(agent, AgentState.OFFLINE, None, now, "server")
        self.store.put_agent(agent)
        log.info("agent offline", extra={"agent_id": agent_id})
        self._notify(AgentEventType.OFFLINE, agent)
        self._publish_after_commit(AgentEventType.OFFLINE, agent, transition, now)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_state(state: int, field: str, *, allow_unspecified: bool = False) -> AgentState:
        try:
            s = AgentState(state)
        except ValueError:
            raise InvalidArgument(
                f"{field} {state} is not a known AgentState", field=field
            ) from None
        if s == AgentState.UNSPECIFIED and not allow_unspecified:
            raise InvalidArgument(f"{field} is required", field=field)
        return s

    def _transition(
        self,
        agent: Agent,
        to_state: AgentState,
        details: Payload,
        observe_time: datetime,
        source: str,
        out_of_order: bool = False,
    ) -> StateTransition:
        agent.history_seq += 1
        t = StateTransition(
            agent_id=agent.agent_id,
            sequence=agent.history_seq,
            from_state=agent.state,
            to_state=to_state,
            details=details,
            observe_time=observe_time,
            record_time=utcnow(),
            source=source,
            out_of_order=out_of_order,
        )
        if not out_of_order:
            agent.state = to_state
            agent.state_details = details
            agent.state_change_time = observe_time
        self.store.add_transition(t)
        return t

    def _notify(self, event: AgentEventType, agent: Agent) -> None:
        for listener in self.listeners:
            listener(event, agent)

    def _publish(
        self,
        event: AgentEventType,
        agent: Agent,
        transition: StateTransition | None,
        when: datetime,
    ) -> None:
        if len(self.events):
            self.events.publish(AgentEvent(event, agent, transition, when))

    def _publish_after_commit(
        self,
        event: AgentEventType,
        agent: Agent,
        transition: StateTransition | None,
        when: datetime,
    ) -> None:
        """For changes the server makes on its own: commit, then tell watchers."""
        snap = self.snapshot(agent)
        fut = self.store.batch()

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._publish(event, snap, transition, when)

        fut.add_done_callback(done)

    def watch(
        self, agent_ids: list[str], capability: str, event_types: list[int]
    ) -> Watcher[AgentEvent]:
        ids = set(agent_ids)
        kinds = set()
        for i, k in enumerate(event_types):
            try:
                kind = AgentEventType(k)
            except ValueError:
                raise InvalidArgument(
                    f"event_types[{i}] {k} is not a known AgentEventType",
                    field=f"event_types[{i}]",
                ) from None
            if kind == AgentEventType.UNSPECIFIED:
                raise InvalidArgument(
                    f"event_types[{i}] must not be UNSPECIFIED", field=f"event_types[{i}]"
                )
            kinds.add(kind)

        def accept(e: AgentEvent) -> bool:
            return (
                (not ids or e.agent.agent_id in ids)
                and (not capability or capability in e.agent.capabilities)
                and (not kinds or e.event_type in kinds)
            )

        return self.events.watch(accept)


def _agent_size(a: Agent) -> int:
    """About what an Agent message takes on the wire, to cut pages to fit."""
    return (
        200
        + len(a.agent_id)
        + len(a.name)
        + len(a.version)
        + len(a.contact_endpoint)
        + sum(len(c) + 2 for c in a.capabilities)
        + sum(len(k) + len(val) + 4 for k, val in a.metadata.items())
        + len(a.state_details or b"")
    )
