"""Hypothesis strategies that build requests from the message descriptors.

`requests(method, pools)` walks `DESCRIPTOR.fields` recursively, so a field added
to a proto is fuzzed without anyone remembering to. Every field gets either a
hostile value of its type (tests/support/hostile_values.py) or, where its name
says what it is, a plausible one (the id of a registered agent, of a real task
...), so that requests get past the first check. Half the examples start from a
valid request of the method (`templates`) and break one or two fields of it,
which reaches the checks behind the first one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import (
    descriptor,
    duration_pb2,
    message,
    message_factory,
    struct_pb2,
    timestamp_pb2,
)
from hypothesis import strategies as st
from opscore_proto.v1 import common_pb2, lifecycle_pb2, workflow_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb

from opscore import limits
from tests.support import hostile_values as hv
from tests.support.hostile import Method

FD = descriptor.FieldDescriptor
MAX_MESSAGE_DEPTH = 4


@dataclass(eq=False)  # hashed by identity: strategies are cached per pool
class Pools:
    """Ids the server knows, for plausible values. Grown from responses."""

    agents: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    definitions: list[str] = field(default_factory=list)
    # (task_id, agent_id, attempt) of leases held by the fixture's idle worker.
    leases: list[tuple[str, str, int]] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=lambda: ["fuzz", "held"])

    LIMIT = 200

    def harvest(self, msg: message.Message) -> None:
        """Remember ids found anywhere in a response."""
        for fd, value in msg.ListFields():
            if fd.type == FD.TYPE_MESSAGE:
                if fd.message_type.GetOptions().map_entry:
                    continue
                items = value if fd.is_repeated else [value]
                for item in list(items)[:20]:
                    self.harvest(item)
            elif fd.type == FD.TYPE_STRING and not fd.is_repeated and value:
                pool = {
                    "agent_id": self.agents,
                    "task_id": self.tasks,
                    "session_id": self.sessions,
                    "definition_id": self.definitions,
                }.get(fd.name)
                if fd.name == "id" and msg.DESCRIPTOR.name == "WorkflowDefinition":
                    pool = self.definitions
                if pool is not None and value not in pool and len(pool) < self.LIMIT:
                    pool.append(value)


def _pick(pool: list[Any]) -> st.SearchStrategy[Any]:
    """A member of a pool that may grow during the run; the index is drawn, so
    the example replays from its choice sequence."""
    return st.integers(0, 2**16).map(lambda i: pool[i % len(pool)] if pool else "")


# ------------------------------------------------------------------ scalars


@functools.cache
def huge_strings() -> st.SearchStrategy[str]:
    return st.builds(
        lambda n, ch: ch * n, st.sampled_from(hv.HUGE_STRING_LENGTHS), st.sampled_from("aé😀")
    )


@functools.cache
def hostile_strings(small: bool = False) -> st.SearchStrategy[str]:
    base = [
        st.sampled_from(hv.HOSTILE_STRINGS[:14] if small else hv.HOSTILE_STRINGS),
        st.text(max_size=40),
        st.text(alphabet="abcXYZ019._:-/", min_size=1, max_size=130),
    ]
    return st.one_of(*base) if small else st.one_of(*base, huge_strings())


@functools.cache
def hostile_sources() -> st.SearchStrategy[str]:
    depths = st.sampled_from((50, 200, 1000, 5000, 100_000))
    return st.one_of(
        st.sampled_from(hv.GARBAGE_SOURCES),
        depths.map(hv.deep_json),
        depths.map(hv.deep_json_bare),
        depths.map(hv.deep_yaml_flow),
        st.sampled_from((30, 100, 400)).map(hv.deep_yaml_block),
        # Small enough to finish quickly on a server without an expansion bound.
        st.integers(2, 6).map(hv.billion_laughs),
        st.integers(1, 30).map(lambda n: hv.large_yaml_definition(n, chain=n % 2 == 0)),
        st.text(max_size=200),
    )


@functools.cache
def plausible_string(
    fd: FD, parent: descriptor.Descriptor, pools: Pools, small: bool = False
) -> st.SearchStrategy[str]:
    name = fd.name
    if name in ("agent_id", "agent_ids", "assigned_agent_id"):
        return _pick(pools.agents)
    if name == "task_id":
        return _pick(pools.tasks)
    if name == "session_id":
        return _pick(pools.sessions)
    if name == "definition_id":
        return _pick(pools.definitions)
    if name in ("capability", "capabilities"):
        return _pick(pools.capabilities)
    if name == "id" and parent.name == "WorkflowDefinition":
        return st.sampled_from(["wf-fuzz", "wf-other"])
    if name in ("id", "depends_on", "fallback", "workflow_task_id"):
        return st.sampled_from(["t0", "t1", "t2"])
    if name == "page_token":
        return st.one_of(st.sampled_from(hv.FORGED_PAGE_TOKENS), st.binary(max_size=64).map(hv.b64))
    if name == "source":
        return st.sampled_from(hv.GARBAGE_SOURCES) if small else hostile_sources()
    if name == "service":
        return st.sampled_from(["", "opscore.v1.DispatchService", "nope"])
    if name == "message":
        return st.sampled_from(["it broke", "x" * 100])
    return st.text(alphabet="abcdefgh-_.", min_size=1, max_size=20)


@functools.cache
def plausible_int(fd: FD) -> st.SearchStrategy[int]:
    hints: dict[str, tuple[int, ...]] = {
        "attempt": (0, 1, 2),
        "max_in_flight": (0, 1, 2, limits.MAX_IN_FLIGHT, limits.MAX_IN_FLIGHT + 1),
        "page_size": (0, 1, 2, 1000, 1001, -1),
        "version": (0, 1, 2, -1),
        "max_attempts": (0, 1, 3, limits.MAX_ATTEMPTS, limits.MAX_ATTEMPTS + 1, -1),
        "after_sequence": (0, 1, 2, -1),
        "priority": (0, 1, -1, 10),
    }
    values = hints.get(fd.name, (0, 1, 2, 3))
    return st.sampled_from(values)


@functools.cache
def int_strategy(fd: FD) -> st.SearchStrategy[int]:
    if fd.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        lo, hi, extremes = -(2**31), 2**31 - 1, hv.INT32_EXTREMES
    elif fd.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        lo, hi, extremes = 0, 2**32 - 1, hv.UINT32_EXTREMES
    elif fd.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        lo, hi, extremes = 0, 2**64 - 1, hv.UINT64_EXTREMES
    else:
        lo, hi, extremes = -(2**63), 2**63 - 1, hv.INT64_EXTREMES
    return st.one_of(plausible_int(fd), st.sampled_from(extremes), st.integers(lo, hi))


@functools.cache
def double_strategy(fd: FD) -> st.SearchStrategy[float]:
    plausible = st.sampled_from((0.0, 1.0, 1.5, 2.0))
    hostile = st.one_of(st.sampled_from(hv.DOUBLE_EXTREMES), st.floats())
    if fd.type == FD.TYPE_FLOAT:
        hostile = st.one_of(st.sampled_from(hv.DOUBLE_EXTREMES[:4]), st.floats(width=32))
    return st.one_of(plausible, hostile)


@functools.cache
def enum_strategy(fd: FD) -> st.SearchStrategy[int]:
    known = [v.number for v in fd.enum_type.values]
    return st.one_of(st.sampled_from(known), st.sampled_from(hv.UNKNOWN_ENUM_NUMBERS))


# ------------------------------------------------------------------ well-known types


@functools.cache
def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    now = st.integers(-400, 400).map(lambda d: int(time.time()) + d)
    far = st.sampled_from((10**8, 10 * 365 * 86400)).map(lambda d: int(time.time()) + d)
    seconds = st.one_of(
        now,
        far,
        st.sampled_from(hv.TIMESTAMP_SECONDS_BAD + hv.TIMESTAMP_SECONDS_EDGE),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(
        st.sampled_from(hv.NANOS_EDGE + hv.NANOS_BAD), st.integers(-(2**31), 2**31 - 1)
    )
    return st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)


@functools.cache
def durations() -> st.SearchStrategy[duration_pb2.Duration]:
    seconds = st.one_of(
        st.integers(0, 600),
        st.sampled_from(hv.DURATION_SECONDS_BAD + hv.DURATION_SECONDS_EDGE),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(
        st.sampled_from(hv.NANOS_EDGE + hv.NANOS_BAD + (-999_999_999,)),
        st.integers(-(2**31), 2**31 - 1),
    )
    return st.builds(duration_pb2.Duration, seconds=seconds, nanos=nanos)


@functools.cache
def _leaf_values(small: bool = False) -> st.SearchStrategy[struct_pb2.Value]:
    numbers = st.one_of(st.sampled_from(hv.DOUBLE_EXTREMES), st.floats())
    strings = st.text(max_size=20) if small else st.one_of(st.text(max_size=20), huge_strings())
    return st.one_of(
        st.builds(struct_pb2.Value, number_value=numbers),
        st.builds(struct_pb2.Value, string_value=strings),
        st.builds(struct_pb2.Value, bool_value=st.booleans()),
        st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
    )


@functools.cache
@st.composite
def structs(draw: st.DrawFn, small: bool = False) -> struct_pb2.Struct:
    """A Struct nested 1..40 levels deep; unless `small`, one level may hold a
    huge map or list."""
    depth = draw(st.one_of(st.integers(1, 3), st.integers(1, 40)))
    huge_at = -1 if small or draw(st.integers(0, 3)) else draw(st.integers(0, depth - 1))
    huge = draw(st.sampled_from((100, 3000)))
    root = struct_pb2.Struct()
    cur = root
    for level in range(depth):
        # Huge strings only at the top: forty levels of them would be a request
        # of many megabytes that tests nothing a single one does not.
        leaf = draw(_leaf_values(small or level > 0 or level == huge_at))
        width = huge if level == huge_at else draw(st.integers(0, 2))
        for i in range(width):
            cur.fields[f"k{i}"].CopyFrom(leaf)
        if level == depth - 1:
            break
        if draw(st.booleans()):
            cur = cur.fields["nested"].struct_value
        else:
            lst = cur.fields["list"].list_value
            for _ in range(huge if level == huge_at else draw(st.integers(0, 2))):
                lst.values.add().CopyFrom(leaf)
            cur = lst.values.add().struct_value
    cur.fields["leaf"].CopyFrom(draw(_leaf_values(small or depth > 1)))
    return root


@functools.cache
def values(small: bool = False) -> st.SearchStrategy[struct_pb2.Value]:
    return st.one_of(
        _leaf_values(small), structs(small).map(lambda s: struct_pb2.Value(struct_value=s))
    )


@functools.cache
def list_values(small: bool = False) -> st.SearchStrategy[struct_pb2.ListValue]:
    return structs(small).map(
        lambda s: struct_pb2.ListValue(values=[struct_pb2.Value(struct_value=s)])
    )


WELL_KNOWN: dict[str, Callable[[bool], st.SearchStrategy[Any]]] = {
    "google.protobuf.Timestamp": lambda small: timestamps(),
    "google.protobuf.Duration": lambda small: durations(),
    "google.protobuf.Struct": structs,
    "google.protobuf.Value": values,
    "google.protobuf.ListValue": list_values,
}


# ------------------------------------------------------------------ fields and messages


@functools.cache
def scalar_strategy(
    fd: FD, parent: descriptor.Descriptor, pools: Pools, small: bool = False
) -> st.SearchStrategy[Any]:
    if fd.type == FD.TYPE_STRING:
        return st.one_of(plausible_string(fd, parent, pools, small), hostile_strings(small))
    if fd.type == FD.TYPE_BYTES:
        return (
            st.binary(max_size=64)
            if small
            else st.one_of(st.binary(max_size=64), st.just(b"\xff" * 70_000))
        )
    if fd.type == FD.TYPE_BOOL:
        return st.booleans()
    if fd.type == FD.TYPE_ENUM:
        return enum_strategy(fd)
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return double_strategy(fd)
    return int_strategy(fd)


@functools.cache
def element_strategy(
    fd: FD, parent: descriptor.Descriptor, pools: Pools, depth: int, small: bool
) -> st.SearchStrategy[Any]:
    if fd.type == FD.TYPE_MESSAGE:
        return message_strategy(fd.message_type, pools, depth + 1, small)
    return scalar_strategy(fd, parent, pools, small)


@functools.cache
def message_strategy(
    desc: descriptor.Descriptor, pools: Pools, depth: int = 0, small: bool = False
) -> st.SearchStrategy[message.Message]:
    if desc.full_name in WELL_KNOWN:
        return WELL_KNOWN[desc.full_name](small)
    return _random_message(desc, pools, depth, small)


@functools.cache
@st.composite
def _random_message(
    draw: st.DrawFn, desc: descriptor.Descriptor, pools: Pools, depth: int, small: bool
) -> message.Message:
    msg = message_factory.GetMessageClass(desc)()
    if depth > MAX_MESSAGE_DEPTH:
        return msg
    for fd in desc.fields:
        if draw(st.booleans()):
            set_field(msg, fd, draw(field_value(fd, desc, pools, depth, small)))
    return msg


HUGE_SIZES = (limits.MAX_CAPABILITIES + 1, limits.MAX_ENQUEUE_BATCH + 1, 5000)


@functools.cache
@st.composite
def field_value(
    draw: st.DrawFn,
    fd: FD,
    parent: descriptor.Descriptor,
    pools: Pools,
    depth: int,
    small: bool = False,
) -> Any:
    """A value for `fd`: a list for repeated fields, a dict for maps. The
    elements of a huge list or map are drawn small, so a request stays sendable."""
    sizes = (
        st.integers(0, 3) if small else st.one_of(st.integers(0, 3), st.sampled_from(HUGE_SIZES))
    )
    size = draw(sizes)
    if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        key_fd = fd.message_type.fields_by_name["key"]
        val_fd = fd.message_type.fields_by_name["value"]
        if size > 3:
            v = draw(element_strategy(val_fd, fd.message_type, pools, depth, True))
            return {_key(key_fd, i): v for i in range(size)}
        out = {}
        for _ in range(size):
            k = draw(scalar_strategy(key_fd, fd.message_type, pools, small))
            out[k] = draw(element_strategy(val_fd, fd.message_type, pools, depth, small))
        return out
    if not fd.is_repeated:
        return draw(element_strategy(fd, parent, pools, depth, small))
    if size > 3:
        # A huge list repeats one small element: cheap to build and to send.
        return [draw(element_strategy(fd, parent, pools, depth, True))] * size
    return [draw(element_strategy(fd, parent, pools, depth, small)) for _ in range(size)]


def _key(fd: FD, i: int) -> Any:
    if fd.type == FD.TYPE_STRING:
        return f"k{i}"
    if fd.type == FD.TYPE_BOOL:
        return bool(i % 2)
    return i


def set_field(msg: message.Message, fd: FD, value: Any) -> None:
    """Set `fd` of `msg` to `value`; values protobuf itself refuses to hold (a
    float32 overflow, say) leave the field unset."""
    try:
        if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            target = getattr(msg, fd.name)
            target.clear()
            for k, v in value.items():
                if isinstance(v, message.Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif fd.is_repeated:
            target = getattr(msg, fd.name)
            del target[:]
            if fd.type == FD.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif fd.type == FD.TYPE_MESSAGE:
            getattr(msg, fd.name).CopyFrom(value)
        else:
            setattr(msg, fd.name, value)
    except (ValueError, TypeError, OverflowError):
        msg.ClearField(fd.name)


# ------------------------------------------------------------------ valid templates


def _dur(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _struct(**kw: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


def _policy() -> common_pb2.RetryPolicy:
    return common_pb2.RetryPolicy(
        max_attempts=3, initial_backoff=_dur(1), backoff_multiplier=2.0, max_backoff=_dur(60)
    )


def _enqueue(pools: Pools, i: int) -> dpb.EnqueueTaskRequest:
    return dpb.EnqueueTaskRequest(
        name=f"fuzz-{i}",
        capability="fuzz",
        input=_struct(n=i),
        priority=1,
        retry_policy=_policy(),
        timeout=_dur(60),
        heartbeat_timeout=_dur(30),
        idempotency_key=f"key-{i}",
    )


def definition(def_id: str = "wf-fuzz") -> workflow_pb2.WorkflowDefinition:
    t0 = workflow_pb2.WorkflowTask(
        id="t0",
        name="first",
        capability="fuzz",
        parameters=_struct(p=1),
        retry_policy=_policy(),
        timeout=_dur(60),
        heartbeat_timeout=_dur(30),
        fallback="t2",
    )
    t1 = workflow_pb2.WorkflowTask(id="t1", capability="fuzz", depends_on=["t0"], priority=2)
    t2 = workflow_pb2.WorkflowTask(id="t2", capability="fuzz")
    return workflow_pb2.WorkflowDefinition(
        id=def_id, name="fuzz", description="d", tasks=[t0, t1, t2], create_time=_now_ts()
    )


def _lease(pools: Pools, i: int) -> tuple[str, str, int]:
    if pools.leases:
        return pools.leases[i % len(pools.leases)]
    return ("no-task", "no-agent", 1)


def _at(pool: list[str], i: int, default: str = "missing") -> str:
    return pool[i % len(pool)] if pool else default


lpb = lifecycle_pb2
wpb = workflow_pb2

TEMPLATES: dict[str, Callable[[Pools, int], message.Message]] = {
    "RegisterAgent": lambda p, i: lpb.RegisterAgentRequest(
        agent_id=f"fz-new-{i}",
        name="n",
        version="1",
        capabilities=["fuzz"],
        contact_endpoint="http://x",
        metadata={"k": "v"},
    ),
    "DeregisterAgent": lambda p, i: lpb.DeregisterAgentRequest(agent_id=_at(p.agents, i)),
    "GetAgent": lambda p, i: lpb.GetAgentRequest(agent_id=_at(p.agents, i)),
    "ListAgents": lambda p, i: lpb.ListAgentsRequest(
        state=lpb.AgentState.AGENT_STATE_IDLE, capability="fuzz", page_size=10
    ),
    "ReportState": lambda p, i: lpb.ReportStateRequest(
        agent_id=_at(p.agents, i),
        state=lpb.AgentState.AGENT_STATE_ACTIVE,
        details=_struct(step=i),
        observe_time=_now_ts(),
    ),
    "Heartbeat": lambda p, i: lpb.HeartbeatRequest(agent_id=_at(p.agents, i)),
    "ListStateTransitions": lambda p, i: lpb.ListStateTransitionsRequest(
        agent_id=_at(p.agents, i), page_size=10
    ),
    "WatchAgents": lambda p, i: lpb.WatchAgentsRequest(
        agent_ids=[_at(p.agents, i)],
        capability="fuzz",
        event_types=[lpb.AgentEventType.AGENT_EVENT_TYPE_STATE_CHANGED],
    ),
    "EnqueueTask": _enqueue,
    "EnqueueTasks": lambda p, i: dpb.EnqueueTasksRequest(
        tasks=[_enqueue(p, i), _enqueue(p, i + 1)]
    ),
    "SubscribeTasks": lambda p, i: dpb.SubscribeTasksRequest(
        agent_id=_at(p.agents, i), capabilities=["fuzz"], max_in_flight=2
    ),
    # A work stream's messages: the first carries hello; the fuzzer sends a second
    # one with the same items (see test_fuzz._send), so both places are hit. Only
    # items valid for any agent (results need a lease the agent holds).
    "Connect": lambda p, i: dpb.ConnectRequest(
        hello=dpb.ConnectHello(agent_id=_at(p.agents, i), capabilities=["fuzz"], max_in_flight=2),
        messages=[
            dpb.AgentMessage(
                id=i + 1,
                state_report=dpb.AgentStateReport(
                    state=lpb.AGENT_STATE_ACTIVE, details=_struct(doing="x")
                ),
            ),
            dpb.AgentMessage(id=i + 2, capacity=dpb.StreamCapacity(max_in_flight=3)),
        ],
    ),
    "CompleteTask": lambda p, i: dpb.CompleteTaskRequest(
        task_id=_lease(p, i)[0],
        agent_id=_lease(p, i)[1],
        attempt=_lease(p, i)[2],
        output=_struct(ok=True),
    ),
    "FailTask": lambda p, i: dpb.FailTaskRequest(
        task_id=_lease(p, i)[0],
        agent_id=_lease(p, i)[1],
        attempt=_lease(p, i)[2],
        error=common_pb2.TaskError(message="boom", type="E", details=_struct(x=1)),
    ),
    "HeartbeatTask": lambda p, i: dpb.HeartbeatTaskRequest(
        task_id=_lease(p, i)[0],
        agent_id=_lease(p, i)[1],
        attempt=_lease(p, i)[2],
        progress=_struct(pct=50),
    ),
    "GetTask": lambda p, i: dpb.GetTaskRequest(task_id=_at(p.tasks, i)),
    "ListTaskAttempts": lambda p, i: dpb.ListTaskAttemptsRequest(
        task_id=_at(p.tasks, i), page_size=10
    ),
    "ListTasks": lambda p, i: dpb.ListTasksRequest(
        state=dpb.TaskState.TASK_STATE_QUEUED,
        capability="fuzz",
        agent_id=_at(p.agents, i),
        session_id=_at(p.sessions, i),
        page_size=10,
    ),
    "CancelTask": lambda p, i: dpb.CancelTaskRequest(task_id=_at(p.tasks, i), reason="r"),
    "CreateWorkflowDefinition": lambda p, i: wpb.CreateWorkflowDefinitionRequest(
        definition=definition(f"wf-new-{i}")
    ),
    "GetWorkflowDefinition": lambda p, i: wpb.GetWorkflowDefinitionRequest(
        definition_id=_at(p.definitions, i), version=1
    ),
    "ListWorkflowDefinitions": lambda p, i: wpb.ListWorkflowDefinitionsRequest(page_size=10),
    "DeleteWorkflowDefinition": lambda p, i: wpb.DeleteWorkflowDefinitionRequest(
        definition_id=_at(p.definitions, i), version=1
    ),
    "StartWorkflow": lambda p, i: wpb.StartWorkflowRequest(
        definition=definition("wf-inline"),
        input=_struct(x=i),
        agent_id=_at(p.agents, i),
        idempotency_key=f"s-{i}",
    ),
    "GetSession": lambda p, i: wpb.GetSessionRequest(session_id=_at(p.sessions, i)),
    "ListSessions": lambda p, i: wpb.ListSessionsRequest(
        state=wpb.SessionState.SESSION_STATE_RUNNING, definition_id="wf-fuzz", page_size=10
    ),
    "CancelSession": lambda p, i: wpb.CancelSessionRequest(
        session_id=_at(p.sessions, i), reason="r"
    ),
    "WatchSession": lambda p, i: wpb.WatchSessionRequest(
        session_id=_at(p.sessions, i), after_sequence=0
    ),
}


# ------------------------------------------------------------------ field paths


Path = tuple[FD, ...]


def field_paths(desc: descriptor.Descriptor, depth: int = 0) -> list[Path]:
    """Every field reachable from `desc` (through singular and repeated message
    fields, not into the well-known types), as paths from the top."""
    out: list[Path] = []
    if depth > MAX_MESSAGE_DEPTH:
        return out
    for fd in desc.fields:
        out.append((fd,))
        is_message = fd.type == FD.TYPE_MESSAGE
        if is_message and not fd.message_type.GetOptions().map_entry:
            if fd.message_type.full_name in WELL_KNOWN:
                continue
            out += [(fd, *rest) for rest in field_paths(fd.message_type, depth + 1)]
    return out


def target_of(msg: message.Message, path: Path) -> message.Message:
    """The message holding the last field of `path`, created on the way (the first
    element of a repeated field, added if the list is empty)."""
    cur = msg
    for fd in path[:-1]:
        if fd.is_repeated:
            items = getattr(cur, fd.name)
            cur = items[0] if len(items) else items.add()
        else:
            cur = getattr(cur, fd.name)
    return cur


def set_path(msg: message.Message, path: Path, value: Any) -> None:
    set_field(target_of(msg, path), path[-1], value)


def path_name(path: Path) -> str:
    return ".".join(fd.name for fd in path)


@functools.cache
@st.composite
def mutated_template(draw: st.DrawFn, method: Method, pools: Pools) -> message.Message:
    """A valid request of `method` with one to three fields given a drawn value."""
    msg = TEMPLATES[method.name](pools, draw(st.integers(0, 2**16)))
    paths = field_paths(method.input)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = path[-2].message_type if len(path) > 1 else method.input
        set_path(msg, path, draw(field_value(path[-1], parent, pools, len(path))))
    return msg


@functools.cache
def requests(method: Method, pools: Pools) -> st.SearchStrategy[message.Message]:
    return st.one_of(mutated_template(method, pools), message_strategy(method.input, pools))
