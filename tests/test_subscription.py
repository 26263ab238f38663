"""A stream's outbox: what take() hands a work stream, and when it wakes it.

Every end-to-end rule of the work stream rests on these: an agent never gets a
message before the commit that made it, and never out of the order the engine
queued it in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from opscore.errors import Unavailable
from opscore.models import Agent, AgentState
from opscore.subscription import Ack, StreamEnd, Subscription


def subscription() -> Subscription:
    now = datetime.now(UTC)
    agent = Agent(
        agent_id="a-1",
        name="",
        version="",
        capabilities=(),
        contact_endpoint="",
        metadata={},
        state=AgentState.IDLE,
        state_details=None,
        register_time=now,
        state_change_time=now,
        last_seen_time=now,
    )
    return Subscription(
        agent=agent, capabilities=frozenset(), requested=frozenset(), max_in_flight=1
    )


async def pending(task: asyncio.Task[object]) -> bool:
    """Whether `task` is still waiting after everything ready has run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_take_waits_for_the_commit_and_keeps_the_order() -> None:
    loop = asyncio.get_running_loop()
    sub = subscription()
    first, second = loop.create_future(), loop.create_future()
    sub.push((first, Ack(1)))
    sub.push((first, Ack(2)))
    sub.push((second, Ack(3)))
    sub.push((None, StreamEnd(None)))  # queued last: must not overtake the answers
    taking = asyncio.ensure_future(sub.take())
    assert await pending(taking)  # nothing is sent before its commit
    second.set_result(None)  # a later commit ending first releases nothing
    assert await pending(taking)
    first.set_result(None)
    items = await asyncio.wait_for(taking, 5)
    # Everything settled at the head, in order, the end included.
    assert [m for _, m in items] == [Ack(1), Ack(2), Ack(3), StreamEnd(None)]
    assert not sub.outbox


async def test_take_stops_at_the_first_unsettled_commit() -> None:
    loop = asyncio.get_running_loop()
    sub = subscription()
    done, later = loop.create_future(), loop.create_future()
    done.set_result(None)
    sub.push((done, Ack(1)))
    sub.push((later, Ack(2)))
    sub.push((None, StreamEnd(None)))
    items = await asyncio.wait_for(sub.take(), 5)
    assert [m for _, m in items] == [Ack(1)]
    assert [m for _, m in sub.outbox] == [Ack(2), StreamEnd(None)]
    later.set_result(None)
    rest = await asyncio.wait_for(sub.take(), 5)
    assert [m for _, m in rest] == [Ack(2), StreamEnd(None)]


async def test_a_failed_commit_is_handed_over_for_its_reader_to_raise() -> None:
    loop = asyncio.get_running_loop()
    sub = subscription()
    commit = loop.create_future()
    sub.push((commit, Ack(7)))
    taking = asyncio.ensure_future(sub.take())
    assert await pending(taking)
    commit.set_exception(Unavailable("commit failed"))
    [(got, message)] = await asyncio.wait_for(taking, 5)
    assert message == Ack(7)
    with pytest.raises(Unavailable):
        got.result()  # type: ignore[union-attr]


async def test_an_item_without_a_commit_wakes_a_waiting_stream() -> None:
    sub = subscription()
    taking = asyncio.ensure_future(sub.take())
    assert await pending(taking)
    sub.push((None, StreamEnd(None)))
    assert [m for _, m in await asyncio.wait_for(taking, 5)] == [StreamEnd(None)]
