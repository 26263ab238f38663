"""Roles and the permission table: for every RPC of every service, which roles may
call it, and whether the request's `agent_id` names the agent acting (so an
`agent` principal may make the call only for agent ids its entry allows).

One table, one place. An RPC missing from it is refused to every role but
`admin` (and tests/test_security_roles.py fails until it is added).

- `admin`: everything.
- `operator`: workflow definitions, enqueue, start, cancel, and every read and watch.
- `viewer`: reads and watches only.
- `agent`: the calls an agent makes, for the agent ids it is allowed: register,
  deregister, report state, heartbeat, subscribe, complete/fail/heartbeat its
  tasks, and read its own record and history. It lists and watches nothing,
  and reads no task, session or definition: those hold other agents' inputs
  and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    AGENT = "agent"
    VIEWER = "viewer"


ADMIN, OPERATOR, AGENT, VIEWER = Role.ADMIN, Role.OPERATOR, Role.AGENT, Role.VIEWER
_READ = (ADMIN, OPERATOR, VIEWER)


@dataclass(frozen=True, slots=True)
class Rule:
    roles: frozenset[Role]
    # The request's agent_id names the agent acting; an agent may act only as itself.
    agent_scoped: bool = False


def _rule(*roles: Role, agent_scoped: bool = False) -> Rule:
    return Rule(frozenset(roles), agent_scoped)


_LIFECYCLE = "opscore.v1.LifecycleService"
_DISPATCH = "opscore.v1.DispatchService"
_WORKFLOW = "opscore.v1.WorkflowService"

_TABLE: dict[str, dict[str, Rule]] = {
    _LIFECYCLE: {
        "RegisterAgent": _rule(ADMIN, AGENT, agent_scoped=True),
        "DeregisterAgent": _rule(ADMIN, AGENT, agent_scoped=True),
        "GetAgent": _rule(*_READ, AGENT, agent_scoped=True),
        "ListAgents": _rule(*_READ),
        "ReportState": _rule(ADMIN, AGENT, agent_scoped=True),
        "Heartbeat": _rule(ADMIN, AGENT, agent_scoped=True),
        "ListStateTransitions": _rule(*_READ, AGENT, agent_scoped=True),
        "WatchAgents": _rule(*_READ),
    },
    _DISPATCH: {
        "EnqueueTask": _rule(ADMIN, OPERATOR),
        "EnqueueTasks": _rule(ADMIN, OPERATOR),
        "SubscribeTasks": _rule(ADMIN, AGENT, agent_scoped=True),
        # Agent-scoped by its hello, which the servicer checks (require_agent).
        "Connect": _rule(ADMIN, AGENT, agent_scoped=True),
        "CompleteTask": _rule(ADMIN, AGENT, agent_scoped=True),
        "FailTask": _rule(ADMIN, AGENT, agent_scoped=True),
        "HeartbeatTask": _rule(ADMIN, AGENT, agent_scoped=True),
        "GetTask": _rule(*_READ),
        "ListTaskAttempts": _rule(*_READ),
        "ListTasks": _rule(*_READ),
        "CancelTask": _rule(ADMIN, OPERATOR),
    },
    _WORKFLOW: {
        "CreateWorkflowDefinition": _rule(ADMIN, OPERATOR),
        "GetWorkflowDefinition": _rule(*_READ),
        "ListWorkflowDefinitions": _rule(*_READ),
        "DeleteWorkflowDefinition": _rule(ADMIN, OPERATOR),
        "StartWorkflow": _rule(ADMIN, OPERATOR),
        "GetSession": _rule(*_READ),
        "ListSessions": _rule(*_READ),
        "CancelSession": _rule(ADMIN, OPERATOR),
        "WatchSession": _rule(*_READ),
    },
}

#: Full method name ("/package.Service/Method") -> Rule.
PERMISSIONS: dict[str, Rule] = {
    f"/{service}/{name}": rule for service, rules in _TABLE.items() for name, rule in rules.items()
}

_UNLISTED = _rule(ADMIN)


def rule(method: str) -> Rule:
    return PERMISSIONS.get(method, _UNLISTED)


def permits(role: Role, method: str) -> bool:
    return role in rule(method).roles


def agent_scoped(method: str) -> bool:
    return rule(method).agent_scoped


def short_name(method: str) -> str:
    """ "/opscore.v1.DispatchService/GetTask" -> "DispatchService.GetTask"."""
    service, _, name = method.lstrip("/").partition("/")
    return f"{service.rpartition('.')[2]}.{name}"
