"""Agent registry, state reports, history and liveness.

Agents live in storage (opscore.storage.api); every change runs as an operation
and is acknowledged only after commit. Liveness deadlines are the storage's: it
calls back `_silent` once an agent with no open stream anywhere has been quiet
for `agent_timeout`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from opscore import limits
from opscore import validation as v
from opscore.clock import utcnow
from opscore.errors import FailedPrecondition, InvalidArgument, NotFound, OpsCoreError
from opscore.events import Broadcast, Watcher
from opscore.ids import new_id
from opscore.models import (
    Agent,
    AgentEvent,
    AgentEventType,
    AgentState,
    Page,
    StateTransition,
)
from opscore.payload import Payload
from opscore.storage.api import Storage, Tx

log = logging.getLogger("opscore.lifecycle")

# Awaited inside the operation, before its commit, so reactions (ending task
# attempts) are part of the same transaction as the change that caused them.
AgentListener = Callable[[Tx, AgentEventType, Agent], Awaitable[None]]


class LifecycleEngine:
    def __init__(
        self,
        storage: Storage,
        *,
        agent_timeout: timedelta = timedelta(seconds=30),
        encode_event: Callable[[AgentEvent], bytes] = lambda e: b"",
        response_budget: int = limits.DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
    ) -> None:
        self.storage = storage
        self.agent_timeout = agent_timeout
        self.response_budget = response_budget
        self.events: Broadcast[AgentEvent] = Broadcast(encode_event)
        self.listeners: list[AgentListener] = []
        storage.on_agent_silent = self._silent
        storage.subscribe("agent_event", self._on_event_elsewhere)

    def reset(self, error: OpsCoreError) -> None:
        """End every watch with `error` (state is rebuilt under them)."""
        self.events.end_all(error)

    # ------------------------------------------------------------------ queries

    async def get(self, agent_id: str) -> Agent:
        v.require_id(agent_id, "agent_id")
        agent = await self.storage.read_agent(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} is not registered", reason="AGENT_NOT_FOUND")
        return agent

    async def get_for_update(self, tx: Tx, agent_id: str) -> Agent:
        v.require_id(agent_id, "agent_id")
        agent = await tx.agent(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} is not registered", reason="AGENT_NOT_FOUND")
        return agent

    @staticmethod
    def snapshot(agent: Agent) -> Agent:
        return dataclasses.replace(agent, metadata=dict(agent.metadata))

    async def list(
        self, state: AgentState, capability: str, page_size: int, page_token: str
    ) -> Page[Agent]:
        """Ordered by id."""
        self._check_state(state, "state", allow_unspecified=True)
        items, token = await self.storage.list_agents(
            int(state), capability, page_size, page_token, self.response_budget
        )
        return Page(items, token)

    async def list_transitions(
        self, agent_id: str, page_size: int, page_token: str
    ) -> Page[StateTransition]:
        await self.get(agent_id)
        items, token = await self.storage.list_transitions(
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
        self.storage.check_writable()
        agent_id = agent_id or new_id()

        async def op(tx: Tx) -> tuple[Agent, bool]:
            agent = await tx.agent(agent_id)
            now = utcnow()
            with tx.atomic():
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
                    event = AgentEventType.REGISTERED
                    transition = self._transition(tx, agent, AgentState.INITIALIZING, None, now)
                else:
                    event = (
                        AgentEventType.REGISTERED if agent.deregistered else AgentEventType.UPDATED
                    )
                    agent.name, agent.version, agent.capabilities = name, version, caps
                    agent.contact_endpoint, agent.metadata = contact_endpoint, meta
                    agent.last_seen_time = now
                    transition = None
                    if agent.deregistered:
                        agent.deregistered = False
                        transition = self._transition(tx, agent, AgentState.INITIALIZING, None, now)
                tx.put_agent(agent)
                await self._notify(tx, event, agent)
                tx.watch_liveness(agent)
                snap = self.snapshot(agent)
                self._publish_after_commit(tx, event, snap, transition, now)
                return snap, created

        return await self.storage.run(op)

    async def deregister(self, agent_id: str) -> Agent:
        v.require_id(agent_id, "agent_id")
        self.storage.check_writable()

        async def op(tx: Tx) -> Agent:
            agent = await self.get_for_update(tx, agent_id)
            now = utcnow()
            transition = None
            with tx.atomic():
                if not agent.deregistered:
                    agent.deregistered = True
                    if agent.state != AgentState.FINISHED:
                        transition = self._transition(tx, agent, AgentState.FINISHED, None, now)
                    tx.put_agent(agent)
                    await self._notify(tx, AgentEventType.DEREGISTERED, agent)
                snap = self.snapshot(agent)
                self._publish_after_commit(tx, AgentEventType.DEREGISTERED, snap, transition, now)
                return snap

        return await self.storage.run(op)

    async def report_state(
        self,
        agent_id: str,
        state: int,
        details: Payload,
        observe_time: datetime | None,
        *,
        wait: bool = True,
    ) -> tuple[Agent, StateTransition]:
        return await self.storage.run(
            lambda tx: self.report_state_in(tx, agent_id, state, details, observe_time),
            wait=wait,
        )

    async def report_state_in(
        self,
        tx: Tx,
        agent_id: str,
        state: int,
        details: Payload,
        observe_time: datetime | None,
    ) -> tuple[Agent, StateTransition]:
        """`state` is the raw enum number from the request; unknown values are refused."""
        v.require_id(agent_id, "agent_id")
        checked = self._check_state(state, "state")
        if checked == AgentState.OFFLINE:
            raise InvalidArgument(
                "agents cannot report AGENT_STATE_OFFLINE; the server sets it when an agent "
                "stops being live",
                field="state",
            )
        v.payload_size(details, "details", v.MAX_DETAILS)
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
        self.storage.check_writable()
        agent = await self.get_for_update(tx, agent_id)
        if agent.deregistered:
            raise FailedPrecondition(
                f"agent {agent_id!r} is deregistered; register it again first",
                reason="AGENT_DEREGISTERED",
            )
        observed = observe_time or now
        with tx.atomic():
            agent.last_seen_time = now
            out_of_order = observed < agent.state_change_time
            transition = self._transition(
                tx, agent, checked, details, observed, "agent", out_of_order
            )
            tx.put_agent(agent)
            if not out_of_order:
                await self._notify(tx, AgentEventType.STATE_CHANGED, agent)
            tx.watch_liveness(agent)
            snap = self.snapshot(agent)
            self._publish_after_commit(tx, AgentEventType.STATE_CHANGED, snap, transition, now)
            return snap, transition

    async def heartbeat(self, agent_id: str) -> Agent:
        v.require_id(agent_id, "agent_id")
        self.storage.check_writable()

        async def op(tx: Tx) -> Agent:
            agent = await self.get_for_update(tx, agent_id)
            with tx.atomic():
                await self._touch(tx, agent)
                return self.snapshot(agent)

        return await self.storage.run(op)

    # ------------------------------------------------------------------ liveness

    async def touch(self, tx: Tx, agent_id: str) -> None:
        """A sign of life from the agent (a call naming it). Inside the caller's
        atomic change. An agent with a stream open here is live regardless, so the
        hot path (task results on a work stream) does nothing at all; otherwise a
        touch never waits for another operation holding the agent."""
        if tx.streams_here(agent_id):
            return
        agent = await tx.agent(agent_id, wait=False)
        if agent is not None:
            await self._touch(tx, agent)

    async def _touch(self, tx: Tx, agent: Agent) -> None:
        now = utcnow()
        if agent.state == AgentState.OFFLINE and not agent.deregistered:
            agent.last_seen_time = now
            back = agent.state_before_offline or AgentState.IDLE
            transition = self._transition(tx, agent, back, None, now)
            await self._notify(tx, AgentEventType.STATE_CHANGED, agent)
            self._publish_after_commit(
                tx, AgentEventType.STATE_CHANGED, self.snapshot(agent), transition, now
            )
            tx.put_agent(agent)
        elif agent.open_subscriptions == 0:
            # With a stream open the agent is live regardless, so the hot path
            # (task results) does not rewrite the agent row on every call.
            agent.last_seen_time = now
            tx.put_agent(agent)
        else:
            agent.last_seen_time = now
        tx.watch_liveness(agent)

    async def subscription_opened(self, tx: Tx, agent: Agent) -> None:
        """Opening a subscription says the agent is ready. Inside the caller's change."""
        tx.stream_opened(agent)
        now = utcnow()
        agent.last_seen_time = now
        if agent.state in (AgentState.INITIALIZING, AgentState.OFFLINE, AgentState.UNSPECIFIED):
            transition = self._transition(tx, agent, AgentState.IDLE, None, now)
            self._publish_after_commit(
                tx, AgentEventType.STATE_CHANGED, self.snapshot(agent), transition, now
            )
            await self._notify(tx, AgentEventType.STATE_CHANGED, agent)
        tx.put_agent(agent)

    async def subscription_closed(self, tx: Tx, agent_id: str) -> None:
        agent = await tx.agent(agent_id)
        if agent is None:
            return
        tx.stream_closed(agent)
        agent.last_seen_time = utcnow()
        tx.put_agent(agent)
        tx.watch_liveness(agent)

    async def _silent(self, tx: Tx, agent_id: str) -> None:
        """Storage says the agent has had no open stream and no call for the agent
        timeout. Re-checked here, then it goes OFFLINE."""
        agent = await tx.agent(agent_id)
        if agent is None or agent.open_subscriptions > 0:
            return
        now = utcnow()
        if now - agent.last_seen_time < self.agent_timeout:
            tx.watch_liveness(agent)  # seen since: wait for the new deadline
            return
        if agent.deregistered or agent.state in (AgentState.OFFLINE, AgentState.FINISHED):
            return
        with tx.atomic():
            agent.state_before_offline = agent.state
            transition = self._transition(tx, agent, AgentState.OFFLINE, None, now)
            tx.put_agent(agent)
            log.info("agent offline", extra={"agent_id": agent_id})
            await self._notify(tx, AgentEventType.OFFLINE, agent)
            self._publish_after_commit(
                tx, AgentEventType.OFFLINE, self.snapshot(agent), transition, now
            )

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

    @staticmethod
    def _transition(
        tx: Tx,
        agent: Agent,
        to_state: AgentState,
        details: Payload,
        observe_time: datetime,
        source: str = "server",
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
        tx.add_transition(t)
        return t

    async def _notify(self, tx: Tx, event: AgentEventType, agent: Agent) -> None:
        for listener in self.listeners:
            await listener(tx, event, agent)

    def _publish_after_commit(
        self,
        tx: Tx,
        event: AgentEventType,
        agent: Agent,
        transition: StateTransition | None,
        when: datetime,
    ) -> None:
        """Watchers here hear of it once it is committed; other servers on the same
        database are told too, and read it back from storage."""
        seq = transition.sequence if transition is not None else 0
        tx.publish("agent_event", f"{agent.agent_id} {int(event)} {seq}")

        def done() -> None:
            if len(self.events):
                self.events.publish(AgentEvent(event, agent, transition, when))

        tx.after_commit(done)

    def _on_event_elsewhere(self, payload: str) -> None:
        """An agent event committed by another server: the streams of that agent
        here follow it (its state gates their work), and the watchers here see it."""
        agent_id, kind, seq = payload.split(" ")
        if self.storage.streams_here(agent_id):

            async def follow(tx: Tx) -> None:
                agent = await tx.agent(agent_id)
                if agent is not None:
                    with tx.atomic():
                        await self._notify(tx, AgentEventType(int(kind)), agent)

            self.storage.spawn(follow, what="follow an agent changed elsewhere")
        if not len(self.events):
            return

        async def show() -> None:
            agent = await self.storage.read_agent(agent_id)
            if agent is None:
                return
            transition = None
            if int(seq):
                transition = await self.storage.read_transition(agent_id, int(seq))
            self.events.publish(AgentEvent(AgentEventType(int(kind)), agent, transition, utcnow()))

        self.storage.spawn_read(show(), what="relay an agent event")

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
