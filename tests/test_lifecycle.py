"""LifecycleService over a real server and SQLite file."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from opscore_proto.v1 import dispatch_pb2
from opscore_proto.v1 import lifecycle_pb2 as pb

from tests.conftest import StreamReader, eventually, expect_error

pytestmark = pytest.mark.backends("sqlite", "postgres")


S = pb.AgentState


def details(**kw: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def test_register_generates_id_and_starts_initializing(harness):
    resp = await harness.lifecycle.RegisterAgent(
        pb.RegisterAgentRequest(name="a", capabilities=["x", "y", "x"], metadata={"k": "v"})
    )
    assert resp.created is True
    a = resp.agent
    assert len(a.agent_id) == 36
    assert a.state == S.AGENT_STATE_INITIALIZING
    assert list(a.capabilities) == ["x", "y"]
    assert a.metadata == {"k": "v"}
    assert a.register_time.seconds > 0


async def test_reregister_updates_and_keeps_register_time(harness):
    first = await harness.register("agent-1", ["a"], name="one")
    resp = await harness.lifecycle.RegisterAgent(
        pb.RegisterAgentRequest(agent_id="agent-1", name="uno", capabilities=["b"])
    )
    assert resp.created is False
    assert resp.agent.name == "uno"
    assert list(resp.agent.capabilities) == ["b"]
    assert resp.agent.register_time == first.register_time


async def test_register_rejects_bad_input(harness):
    L = harness.lifecycle
    await expect_error(
        L.RegisterAgent(pb.RegisterAgentRequest(agent_id="bad id!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "agent_id",
    )
    await expect_error(
        L.RegisterAgent(pb.RegisterAgentRequest(agent_id="a", capabilities=["has space"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "capabilities[0]",
    )
    big = {f"k{i}": "v" for i in range(65)}
    await expect_error(
        L.RegisterAgent(pb.RegisterAgentRequest(agent_id="a", metadata=big)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "metadata",
    )
    await expect_error(
        L.RegisterAgent(pb.RegisterAgentRequest(agent_id="a", metadata={"k": "v" * 2000})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 1024",
    )
    # Nothing was stored by the refused calls.
    await expect_error(L.GetAgent(pb.GetAgentRequest(agent_id="a")), grpc.StatusCode.NOT_FOUND)


async def test_errors_carry_rich_status_details(harness):
    err = await expect_error(
        harness.lifecycle.RegisterAgent(pb.RegisterAgentRequest(agent_id="bad id!")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    md = dict(err.trailing_metadata() or ())
    assert md.get("x-request-id")
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert info.domain == "opscore" and info.reason == "INVALID_ARGUMENT"
    assert status.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "agent_id"


async def test_request_id_is_echoed(harness):
    call = harness.lifecycle.ListAgents(
        pb.ListAgentsRequest(), metadata=(("x-request-id", "req-123"),)
    )
    await call
    md = dict(await call.trailing_metadata())
    assert md["x-request-id"] == "req-123"


async def test_get_and_list_with_filters_and_paging(harness):
    for i in range(5):
        await harness.register(f"agent-{i}", ["even" if i % 2 == 0 else "odd"])
    await harness.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="agent-2", state=S.AGENT_STATE_IDLE)
    )
    got = await harness.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="agent-3"))
    assert got.agent.capabilities == ["odd"]
    evens = await harness.lifecycle.ListAgents(pb.ListAgentsRequest(capability="even"))
    assert [a.agent_id for a in evens.agents] == ["agent-0", "agent-2", "agent-4"]
    idle = await harness.lifecycle.ListAgents(pb.ListAgentsRequest(state=S.AGENT_STATE_IDLE))
    assert [a.agent_id for a in idle.agents] == ["agent-2"]
    seen, token = [], ""
    while True:
        page = await harness.lifecycle.ListAgents(
            pb.ListAgentsRequest(page_size=2, page_token=token)
        )
        assert len(page.agents) <= 2
        seen += [a.agent_id for a in page.agents]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"agent-{i}" for i in range(5)]
    await expect_error(
        harness.lifecycle.ListAgents(pb.ListAgentsRequest(page_token="garbage!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    await expect_error(
        harness.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="nobody")),
        grpc.StatusCode.NOT_FOUND,
        "nobody",
    )
    await expect_error(
        harness.lifecycle.GetAgent(pb.GetAgentRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_report_state_and_history_newest_first(harness):
    await harness.register("a1")
    for state in (S.AGENT_STATE_IDLE, S.AGENT_STATE_ACTIVE, S.AGENT_STATE_ERROR):
        resp = await harness.lifecycle.ReportState(
            pb.ReportStateRequest(agent_id="a1", state=state, details=details(why="test"))
        )
        assert resp.agent.state == state
    assert resp.agent.state_details["why"] == "test"
    hist = await harness.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="a1", page_size=2)
    )
    assert [t.to_state for t in hist.transitions] == [S.AGENT_STATE_ERROR, S.AGENT_STATE_ACTIVE]
    assert hist.transitions[0].from_state == S.AGENT_STATE_ACTIVE
    assert hist.next_page_token
    rest = await harness.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="a1", page_token=hist.next_page_token)
    )
    assert [t.to_state for t in rest.transitions] == [
        S.AGENT_STATE_IDLE,
        S.AGENT_STATE_INITIALIZING,
    ]
    assert rest.next_page_token == ""


async def test_out_of_order_report_is_kept_but_does_not_change_state(harness):
    await harness.register("a1")
    now = datetime.now(UTC)
    t_new, t_old = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    t_new.FromDatetime(now)
    t_old.FromDatetime(now - timedelta(minutes=5))
    await harness.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_ACTIVE, observe_time=t_new)
    )
    resp = await harness.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_ERROR, observe_time=t_old)
    )
    assert resp.transition.out_of_order is True
    assert resp.agent.state == S.AGENT_STATE_ACTIVE
    hist = await harness.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="a1")
    )
    assert hist.transitions[0].to_state == S.AGENT_STATE_ERROR
    assert hist.transitions[0].out_of_order is True


async def test_report_state_errors(harness):
    L = harness.lifecycle
    await expect_error(
        L.ReportState(pb.ReportStateRequest(agent_id="ghost", state=S.AGENT_STATE_IDLE)),
        grpc.StatusCode.NOT_FOUND,
    )
    await harness.register("a1")
    await expect_error(
        L.ReportState(pb.ReportStateRequest(agent_id="a1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "state is required",
    )
    await expect_error(
        L.ReportState(pb.ReportStateRequest(agent_id="a1", state=42)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a known AgentState",
    )
    await expect_error(
        L.ReportState(pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_OFFLINE)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "OFFLINE",
    )
    await expect_error(
        L.ReportState(
            pb.ReportStateRequest(
                agent_id="a1", state=S.AGENT_STATE_IDLE, details=details(blob="x" * 70000)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "details",
    )
    await L.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="a1"))
    await expect_error(
        L.ReportState(pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_IDLE)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "deregistered",
    )
    got = await L.GetAgent(pb.GetAgentRequest(agent_id="a1"))
    assert got.agent.state == S.AGENT_STATE_FINISHED


async def test_deregister_keeps_history_and_reregister_revives(harness):
    L = harness.lifecycle
    await harness.register("a1")
    resp = await L.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="a1"))
    assert resp.agent.deregistered is True
    await expect_error(
        L.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    hist = await L.ListStateTransitions(pb.ListStateTransitionsRequest(agent_id="a1"))
    assert [t.to_state for t in hist.transitions] == [
        S.AGENT_STATE_FINISHED,
        S.AGENT_STATE_INITIALIZING,
    ]
    again = await harness.register("a1", ["z"])
    assert again.deregistered is False and again.state == S.AGENT_STATE_INITIALIZING


async def test_silent_agent_goes_offline_and_heartbeat_brings_it_back(make_harness):
    h = await make_harness(agent_timeout=timedelta(milliseconds=300))
    await h.register("a1")
    await h.lifecycle.ReportState(pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_ACTIVE))

    async def offline():
        got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
        return got.agent.state == S.AGENT_STATE_OFFLINE

    await eventually(offline, what="agent marked OFFLINE")
    back = await h.lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="a1"))
    assert back.agent.state == S.AGENT_STATE_ACTIVE
    hist = await h.lifecycle.ListStateTransitions(pb.ListStateTransitionsRequest(agent_id="a1"))
    assert [t.to_state for t in hist.transitions][:2] == [
        S.AGENT_STATE_ACTIVE,
        S.AGENT_STATE_OFFLINE,
    ]
    assert hist.transitions[1].source == "server"


async def test_open_subscription_keeps_agent_live(make_harness):
    h = await make_harness(agent_timeout=timedelta(milliseconds=200))
    await h.register("a1", ["c"])
    sub = StreamReader(h.dispatch.SubscribeTasks(dispatch_pb2.SubscribeTasksRequest(agent_id="a1")))

    async def idle():
        got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
        return got.agent if got.agent.open_subscriptions == 1 else None

    agent = await eventually(idle, what="subscription open")
    assert agent.state == S.AGENT_STATE_IDLE
    # Several agent timeouts pass while the stream stays open: still live. A
    # stand-in agent without a stream, registered at the same time, goes offline.
    await h.register("witness")

    async def witness_offline():
        got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="witness"))
        return got.agent.state == S.AGENT_STATE_OFFLINE

    await eventually(witness_offline, what="witness offline")
    got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
    assert got.agent.state == S.AGENT_STATE_IDLE
    await sub.close()

    async def a1_offline():
        got = await h.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
        return got.agent.state == S.AGENT_STATE_OFFLINE

    await eventually(a1_offline, what="a1 offline after its stream closed")


async def test_watch_agents_streams_filtered_events(harness):
    all_events = StreamReader(harness.lifecycle.WatchAgents(pb.WatchAgentsRequest()))
    only_b = StreamReader(
        harness.lifecycle.WatchAgents(
            pb.WatchAgentsRequest(agent_ids=["b"], event_types=[pb.AGENT_EVENT_TYPE_STATE_CHANGED])
        )
    )
    # The watch is registered when its first message could be sent; make sure
    # both streams are open before acting.
    await eventually(lambda: len(harness.server.lifecycle.events) == 2, what="watchers")
    await harness.register("a")
    await harness.register("b")
    await harness.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="b", state=S.AGENT_STATE_IDLE)
    )
    await harness.lifecycle.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="a"))
    kinds = [(await all_events.next()) for _ in range(4)]
    assert [(e.event_type, e.agent.agent_id) for e in kinds] == [
        (pb.AGENT_EVENT_TYPE_REGISTERED, "a"),
        (pb.AGENT_EVENT_TYPE_REGISTERED, "b"),
        (pb.AGENT_EVENT_TYPE_STATE_CHANGED, "b"),
        (pb.AGENT_EVENT_TYPE_DEREGISTERED, "a"),
    ]
    e = await only_b.next()
    assert e.agent.agent_id == "b" and e.transition.to_state == S.AGENT_STATE_IDLE
    assert only_b.queue.empty()
    await expect_error(
        harness.lifecycle.WatchAgents(pb.WatchAgentsRequest(event_types=[99])).read(),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await all_events.close()
    await only_b.close()


async def test_restart_keeps_agents_and_history(harness):
    await harness.register("a1", ["c"], name="keeper", metadata={"team": "x"})
    await harness.lifecycle.ReportState(
        pb.ReportStateRequest(agent_id="a1", state=S.AGENT_STATE_ACTIVE)
    )
    await harness.restart()
    got = await harness.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
    assert got.agent.name == "keeper" and got.agent.metadata == {"team": "x"}
    assert got.agent.state == S.AGENT_STATE_ACTIVE
    hist = await harness.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="a1")
    )
    assert [t.to_state for t in hist.transitions] == [
        S.AGENT_STATE_ACTIVE,
        S.AGENT_STATE_INITIALIZING,
    ]


async def test_concurrent_reports_all_recorded(harness):
    await harness.register("busy")
    states = [S.AGENT_STATE_IDLE, S.AGENT_STATE_ACTIVE] * 50
    await asyncio.gather(
        *(
            harness.lifecycle.ReportState(pb.ReportStateRequest(agent_id="busy", state=s))
            for s in states
        )
    )
    hist = await harness.lifecycle.ListStateTransitions(
        pb.ListStateTransitionsRequest(agent_id="busy", page_size=1000)
    )
    assert len(hist.transitions) == 101
    seqs = [t.sequence for t in hist.transitions]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 101
    # Group commit: far fewer commits than calls.
    assert harness.server.storage.commits < 100
