"""Workflow definitions: reading them (protobuf, JSON, YAML, the earlier Ops-Core
format) and validating them, with errors that name the task and field.

A definition is kept as its `opscore.v1.WorkflowDefinition` message: that is the
contract's own JSON/YAML mapping, and storing its bytes keeps what a session runs
exactly what was validated. The engine works from the `Plan` derived here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import yaml
from google.protobuf import json_format
from opscore_proto.v1 import workflow_pb2

from opscore import limits
from opscore import validation as v
from opscore.errors import InvalidArgument
from opscore.models import RetryPolicy
from opscore.protovalues import from_dur, payload
from opscore.taskspec import RetryPolicySpec
from opscore.workflow import shape
from opscore.workflow.problems import Problems

MAX_TASKS = limits.MAX_WORKFLOW_TASKS
_TASK_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

Definition = workflow_pb2.WorkflowDefinition


@dataclass(frozen=True, slots=True)
class PlanTask:
    """One validated step, ready for the engine."""

    id: str
    position: int
    capability: str
    agent_id: str
    name: str
    parameters: bytes | None
    depends_on: tuple[str, ...]
    dependents: tuple[str, ...]
    retry_policy: RetryPolicy
    timeout: timedelta | None
    heartbeat_timeout: timedelta | None
    priority: int
    fallback: str
    # For a fallback task: the task it stands in for; "" otherwise.
    replaces: str


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: dict[str, PlanTask]
    order: tuple[str, ...]
    roots: tuple[str, ...]
    sinks: tuple[str, ...]


# ---------------------------------------------------------------- reading


_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster
_BRACKETS = re.compile(r"[^\[\]{}]+")
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_YamlLoader):  # type: ignore[misc, valid-type]
    """A SafeLoader whose mappings remember keys written twice."""


def _yaml_mapping(loader: Any, node: yaml.MappingNode) -> Any:
    data = shape.Mapping()
    yield data
    # Before construct_mapping, which resolves merge keys (`<<: *base`) into the
    # node: a key that overrides a merged one is meant, one written twice is not.
    seen: set[tuple[str, str]] = set()
    dups: list[str] = []
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
            key = (key_node.tag, key_node.value)
            if key in seen and key_node.value not in dups:
                dups.append(key_node.value)
            seen.add(key)
    data.update(loader.construct_mapping(node))
    data.duplicates = tuple(dups)


_Loader.add_constructor("tag:yaml.org,2002:map", _yaml_mapping)


def parse_source(source: str, *, origin: str = "source") -> Definition:
    """JSON or YAML text (proto field names), or the earlier Ops-Core format.

    Hostile text is bounded before it can cost much: nesting depth is checked on
    the raw text (deep flow nesting would otherwise recurse in the parser), and
    the parsed document's size is counted with aliases expanded (a few hundred
    bytes of YAML anchors can stand for billions of nodes).

    A document of the wrong shape (unknown fields, values of the wrong kind) is
    refused with every problem it has, those that validate() would find included,
    in one InvalidArgument (see shape and problems).
    """
    if not source.strip():
        raise InvalidArgument(f"{origin} is empty", field="source")
    _check_bracket_depth(source, origin)
    try:
        data = json.loads(source, object_pairs_hook=shape.json_object)
    except ValueError:
        try:
            data = yaml.load(source, Loader=_Loader)  # a SafeLoader: plain data only
        except yaml.YAMLError as exc:
            raise InvalidArgument(
                f"{origin} is neither valid JSON nor valid YAML: {exc}", field="source"
            ) from None
        except RecursionError:
            raise InvalidArgument(
                f"{origin} is nested too deeply (at most {limits.MAX_SOURCE_DEPTH} levels)",
                field="source",
            ) from None
    except RecursionError:
        raise InvalidArgument(
            f"{origin} is nested too deeply (at most {limits.MAX_SOURCE_DEPTH} levels)",
            field="source",
        ) from None
    _check_document_size(data, origin)
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"{origin} must be a mapping with 'id' and 'tasks', not {type(data).__name__}",
            field="source",
        )
    if _is_legacy(data):
        data = _from_legacy(data, origin)
    problems = Problems()
    walk = shape.Shape(problems)
    cleaned = walk.definition(data)
    if not problems:
        return _to_message(cleaned, origin)
    # Report what validation would find too, except the consequences of what
    # the walk already reported (a misspelt `capabilty` is not also a task
    # with no capability).
    try:
        partial = _to_message(cleaned, origin)
    except InvalidArgument:
        raise problems.error() from None
    more = Problems(ignore=walk.covered)
    _check(partial, more, require_id=True)
    problems.absorb(more)
    raise problems.error()


def _to_message(data: dict[str, Any], origin: str) -> Definition:
    msg = Definition()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{origin}: {exc}", field="source") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # json_format lets some conversion errors through unwrapped (huge ints,
        # out-of-range timestamps); they are still the document's fault.
        raise InvalidArgument(f"{origin}: {exc}", field="source") from None
    return msg


def _check_bracket_depth(source: str, origin: str) -> None:
    depth = deepest = 0
    for ch in "".join(_BRACKETS.split(source)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    if deepest > limits.MAX_SOURCE_DEPTH:
        raise InvalidArgument(
            f"{origin} nests brackets {deepest} levels deep; at most {limits.MAX_SOURCE_DEPTH}",
            field="source",
        )


def _check_document_size(data: Any, origin: str) -> None:
    """Count nodes as a walk would meet them (a shared alias counts every time)."""
    budget = limits.MAX_SOURCE_NODES
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise InvalidArgument(
                f"{origin} expands to more than {limits.MAX_SOURCE_NODES} values (YAML "
                "aliases included); a workflow definition is never that large",
                field="source",
            )
        if depth > limits.MAX_SOURCE_DEPTH:
            raise InvalidArgument(
                f"{origin} is nested more than {limits.MAX_SOURCE_DEPTH} levels deep",
                field="source",
            )
        if isinstance(node, dict):
            for k, val in node.items():
                stack.append((k, depth + 1))
                stack.append((val, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)


def _is_legacy(data: dict[str, Any]) -> bool:
    tasks = data.get("tasks")
    return isinstance(tasks, list) and any(isinstance(t, dict) and "taskId" in t for t in tasks)


def _from_legacy(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """The earlier format: a linear chain of {taskId, name, agentCapability,
    parameters, nextTaskId}. Each task depends on the one whose nextTaskId names it."""
    tasks_in = data["tasks"]
    out_tasks: list[dict[str, Any]] = []
    previous: dict[str, str] = {}
    for i, t in enumerate(tasks_in):
        if not isinstance(t, dict) or not t.get("taskId"):
            raise InvalidArgument(f"{origin}: tasks[{i}] has no taskId", field=f"tasks[{i}]")
        nxt = t.get("nextTaskId")
        if nxt:
            previous[str(nxt)] = str(t["taskId"])
    for t in tasks_in:
        task_id = str(t["taskId"])
        converted: dict[str, Any] = {"id": task_id}
        if t.get("name"):
            converted["name"] = str(t["name"])
        if t.get("agentCapability"):
            converted["capability"] = str(t["agentCapability"])
        if t.get("parameters") is not None:
            converted["parameters"] = t["parameters"]
        if task_id in previous:
            converted["depends_on"] = [previous[task_id]]
        out_tasks.append(converted)
    name = str(data.get("name") or "")
    ident = data.get("id") or data.get("workflowId") or _slug(name)
    version = data.get("version")
    out: dict[str, Any] = {"id": str(ident or ""), "tasks": out_tasks}
    if name:
        out["name"] = name
    if data.get("description"):
        out["description"] = str(data["description"])
    if isinstance(version, int):
        out["version"] = version  # string versions ("1.0") of the old format mean "next"
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:128]


def content_hash(d: Definition) -> str:
    """Identity of a definition's content: everything but version and create time."""
    c = Definition()
    c.CopyFrom(d)
    c.version = 0
    c.ClearField("create_time")
    return hashlib.sha256(c.SerializeToString(deterministic=True)).hexdigest()


# ---------------------------------------------------------------- validation


def _dur(msg: Any, field: str) -> timedelta | None:
    """A Duration field already checked by validate() (so it is in range)."""
    return from_dur(msg, field)


def validate(d: Definition, *, require_id: bool = True) -> Plan:
    """Check everything DESIGN §4 asks; return the plan the engine runs, or raise
    InvalidArgument with every problem found (see problems.Problems)."""
    problems = Problems()
    fallback_of, policies = _check(d, problems, require_id=require_id)
    if problems:
        raise problems.error()
    return _plan(d, fallback_of, policies)


def _check(
    d: Definition, problems: Problems, *, require_id: bool
) -> tuple[dict[str, str], dict[str, RetryPolicy]]:
    """Record every problem of `d`; return its fallbacks and retry policies."""
    bad = problems.add
    if require_id:
        try:
            v.require_id(d.id, "id", what="definition id")
        except InvalidArgument as exc:
            bad("id", exc.message)
    if d.version < 0:
        bad("version", "version must not be negative")
    if not d.tasks:
        bad("tasks", "a workflow needs at least one task")
    if len(d.tasks) > MAX_TASKS:
        bad("tasks", f"a workflow has at most {MAX_TASKS} tasks, this one has {len(d.tasks)}")
    # The dependency graph can be searched for cycles only when every edge is sound.
    graph_ok = True
    ids: dict[str, int] = {}
    for i, t in enumerate(d.tasks):
        if not t.id:
            graph_ok = False
            bad(f"tasks[{i}].id", f"tasks[{i}] has no id; {_TASK_ID_RULE}")
        elif not _TASK_ID.match(t.id):
            graph_ok = False
            bad(f"tasks[{i}].id", f"task id {t.id[:64]!r} is not valid; {_TASK_ID_RULE}")
        elif t.id in ids:
            graph_ok = False
            bad(
                f"tasks[{i}].id", f"task {t.id!r} is defined twice (tasks[{ids[t.id]}], tasks[{i}])"
            )
        else:
            ids[t.id] = i
    fallback_of: dict[str, str] = {}
    policies: dict[str, RetryPolicy] = {}
    for i, t in enumerate(d.tasks):
        name = f"task {t.id!r}" if t.id else f"tasks[{i}]"
        if bool(t.capability) == bool(t.agent_id):
            bad(
                f"tasks[{i}].capability",
                f"{name}: set exactly one of capability and agent_id"
                if t.capability
                else f"{name} has neither capability nor agent_id",
            )
        elif t.capability:
            try:
                v.capability(t.capability, "capability")
            except InvalidArgument as exc:
                bad(f"tasks[{i}].capability", f"{name}: {exc.message}")
        elif t.agent_id:
            try:
                v.require_id(t.agent_id, "agent_id")
            except InvalidArgument as exc:
                bad(f"tasks[{i}].agent_id", f"{name}: {exc.message}")
        seen: set[str] = set()
        for j, dep in enumerate(t.depends_on):
            field = f"tasks[{i}].depends_on[{j}]"
            if dep == t.id:
                graph_ok = False
                bad(field, f"{name} depends on itself")
            elif dep not in ids:
                graph_ok = False
                bad(
                    field,
                    f"{name} depends on unknown task {dep[:64]!r}{_guess(dep, ids, problems)}",
                )
            elif dep in seen:
                bad(field, f"{name} lists dependency {dep!r} twice")
            seen.add(dep)
        if t.fallback:
            field = f"tasks[{i}].fallback"
            if t.fallback == t.id:
                graph_ok = False
                bad(field, f"{name} names itself as its fallback")
            elif t.fallback not in ids:
                graph_ok = False
                bad(
                    field,
                    f"{name} has unknown fallback {t.fallback[:64]!r}"
                    f"{_guess(t.fallback, ids, problems)}",
                )
            elif t.fallback in fallback_of:
                bad(
                    field,
                    f"{name}: task {t.fallback!r} is already the fallback of "
                    f"{fallback_of[t.fallback]!r}; a fallback replaces one task",
                )
            else:
                fallback_of[t.fallback] = t.id
        for fname in ("timeout", "heartbeat_timeout"):
            try:
                value = from_dur(t, fname, f"tasks[{i}].")
                v.duration(value, fname, limits.MAX_TASK_TIMEOUT, positive=True)
            except InvalidArgument as exc:
                bad(f"tasks[{i}].{fname}", f"{name}: {exc.message}")
        if not -(2**31) <= t.priority < 2**31:
            bad(f"tasks[{i}].priority", f"{name}: priority must fit in 32 bits")
        if t.HasField("retry_policy"):
            policy = _retry_policy(t.retry_policy, f"tasks[{i}].", name, problems)
            if policy is not None:
                policies[t.id] = policy
        try:
            v.payload_size(payload(t, "parameters", f"tasks[{i}]."), "parameters")
        except InvalidArgument as exc:
            bad(f"tasks[{i}].parameters", f"{name}: {exc.message}")
    size = d.ByteSize()
    if size > limits.MAX_DEFINITION_BYTES:
        bad(
            "tasks",
            f"the definition is {size} bytes serialized; at most {limits.MAX_DEFINITION_BYTES}",
        )
    for fb, principal in fallback_of.items():
        i = ids[fb]
        if d.tasks[i].depends_on:
            bad(
                f"tasks[{i}].depends_on",
                f"task {fb!r} is the fallback of {principal!r} and must not have depends_on: "
                f"it receives the upstream of {principal!r}",
            )
    for i, t in enumerate(d.tasks):
        for j, dep in enumerate(t.depends_on):
            if dep in fallback_of:
                bad(
                    f"tasks[{i}].depends_on[{j}]",
                    f"task {t.id!r} depends on {dep!r}, which is the fallback of "
                    f"{fallback_of[dep]!r}: depend on {fallback_of[dep]!r} instead",
                )
    if graph_ok and d.tasks:
        cycle = _find_cycle(d, fallback_of)
        if cycle:
            i = ids[cycle[0]]
            bad(
                f"tasks[{i}].depends_on",
                "dependency cycle: " + " -> ".join([*cycle, cycle[0]]),
            )
    return fallback_of, policies


_TASK_ID_RULE = "a task id is 1-128 characters of letters, digits, . _ -"


def _guess(name: str, ids: dict[str, int], problems: Problems) -> str:
    """ "; did you mean 'x'?" for a misspelt task id ("" when not shown anyway)."""
    if not problems.room:
        return ""
    close = difflib.get_close_matches(name, ids, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _retry_policy(rp: Any, prefix: str, name: str, problems: Problems) -> RetryPolicy | None:
    """The resolved policy, or None with each of its problems recorded."""
    where = f"{prefix}retry_policy"
    try:
        spec = RetryPolicySpec(
            max_attempts=rp.max_attempts,
            initial_backoff=from_dur(rp, "initial_backoff", f"{where}."),
            backoff_multiplier=rp.backoff_multiplier,
            max_backoff=from_dur(rp, "max_backoff", f"{where}."),
        )
    except InvalidArgument as exc:
        problems.add(exc.violations[0].field, f"{name}: {exc.message}")
        return None
    try:
        return spec.resolve()
    except InvalidArgument as first:
        # resolve() stops at the first problem: ask again field by field so that
        # every one is reported, then the cross-field one if it was alone.
        found = False
        for one in (
            RetryPolicySpec(max_attempts=spec.max_attempts),
            RetryPolicySpec(initial_backoff=spec.initial_backoff),
            RetryPolicySpec(backoff_multiplier=spec.backoff_multiplier),
            RetryPolicySpec(max_backoff=spec.max_backoff),
        ):
            try:
                one.resolve()
            except InvalidArgument as exc:
                found = True
                problems.add(f"{prefix}{exc.violations[0].field}", f"{name}: {exc.message}")
        if not found:
            problems.add(f"{prefix}{first.violations[0].field}", f"{name}: {first.message}")
        return None


def _find_cycle(d: Definition, fallback_of: dict[str, str]) -> list[str]:
    """A cycle through depends_on and fallback edges, or [] (Kahn's algorithm)."""
    edges: dict[str, list[str]] = {t.id: [] for t in d.tasks}
    indeg: dict[str, int] = {t.id: 0 for t in d.tasks}
    for t in d.tasks:
        for dep in t.depends_on:
            edges[dep].append(t.id)
            indeg[t.id] += 1
        if t.fallback:
            edges[t.id].append(t.fallback)
            indeg[t.fallback] += 1
    queue = deque(k for k, n in indeg.items() if n == 0)
    while queue:
        k = queue.popleft()
        for nxt in edges[k]:
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                queue.append(nxt)
    remaining = {k for k, n in indeg.items() if n > 0}
    if not remaining:
        return []
    # Walk backwards along dependencies inside the remaining set to show one cycle.
    back: dict[str, list[str]] = {k: [] for k in remaining}
    for src, targets in edges.items():
        for dst in targets:
            if src in remaining and dst in remaining:
                back[dst].append(src)
    start = min(remaining)
    path, seen = [start], {start: 0}
    while True:
        nxt = back[path[-1]][0]
        if nxt in seen:
            cycle = list(reversed(path[seen[nxt] :]))
            first = cycle.index(min(cycle))
            return cycle[first:] + cycle[:first]
        seen[nxt] = len(path)
        path.append(nxt)


def _plan(d: Definition, fallback_of: dict[str, str], policies: dict[str, RetryPolicy]) -> Plan:
    dependents: dict[str, list[str]] = {t.id: [] for t in d.tasks}
    for t in d.tasks:
        for dep in t.depends_on:
            dependents[dep].append(t.id)
    tasks: dict[str, PlanTask] = {}
    for i, t in enumerate(d.tasks):
        tasks[t.id] = PlanTask(
            id=t.id,
            position=i,
            capability=t.capability,
            agent_id=t.agent_id,
            name=t.name or t.id,
            parameters=(
                t.parameters.SerializeToString(deterministic=True)
                if t.HasField("parameters")
                else None
            ),
            depends_on=tuple(t.depends_on),
            dependents=tuple(dependents[t.id]),
            retry_policy=policies.get(t.id, RetryPolicy()),
            timeout=_dur(t, "timeout"),
            heartbeat_timeout=_dur(t, "heartbeat_timeout"),
            priority=t.priority,
            fallback=t.fallback,
            replaces=fallback_of.get(t.id, ""),
        )
    order = tuple(t.id for t in d.tasks)
    roots = tuple(k for k in order if not tasks[k].depends_on and not tasks[k].replaces)
    sinks = tuple(k for k in order if not tasks[k].dependents and not tasks[k].replaces)
    return Plan(tasks, order, roots, sinks)
