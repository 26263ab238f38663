"""Who is calling: the principal of the current RPC, for servicers that need it.

The interceptor authenticates every call and sets its `CallAuth` in a context
variable before the servicer runs, so inside a servicer (and anything it awaits
in the same task):

    from opscore import security

    security.current_principal().allows_agent(agent_id)   # a yes/no question
    security.require_agent(agent_id)                      # or refuse the call

`require_agent` raises PERMISSION_DENIED (reason AGENT_NOT_ALLOWED) and, on a
stream, records the agent id so that a later change to the principal (a
SIGHUP that narrows its allowance) is checked against it. Use it where the
agent id is not a request field the interceptor already checks, e.g. in the
first message of a bidirectional stream.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase

from opscore.errors import OpsCoreError, PermissionDenied
from opscore.security.roles import Role


@dataclass(frozen=True, slots=True)
class Principal:
    """`agents` is None for principals not limited to agent ids (every role but
    `agent`), else the glob patterns (fnmatch, case-sensitive) of the agent ids
    it may act as."""

    name: str
    role: Role
    agents: tuple[str, ...] | None = None

    def allows_agent(self, agent_id: str) -> bool:
        if self.agents is None:
            return True
        return bool(agent_id) and any(fnmatchcase(agent_id, p) for p in self.agents)


#: Every call when authentication is off.
ANONYMOUS = Principal("anonymous", Role.ADMIN)
#: What current_principal() answers outside an RPC: allowed nothing.
NOBODY = Principal("", Role.VIEWER, agents=())


@dataclass(frozen=True, slots=True)
class Credential:
    """What a call authenticated with, kept to re-check it after a reload: the
    key's digest (never the key) or the certificate subject."""

    kind: str  # "key" | "certificate" | "none"
    value: bytes | str = b""


class CallAuth:
    """The authentication of one call. For streams it is also their entry in the
    interceptor's registry of open streams (for revocation)."""

    __slots__ = ("agent_ids", "credential", "ended", "inside", "method", "principal", "task")

    def __init__(self, principal: Principal, credential: Credential, method: str) -> None:
        self.principal = principal
        self.credential = credential
        self.method = method
        self.agent_ids: list[str] = []
        # Streams only: the handler's task; the error that ends it after a
        # revocation; whether the servicer is running (and can be interrupted).
        self.task: asyncio.Task[object] | None = None
        self.ended: OpsCoreError | None = None
        self.inside = False


_call: ContextVar[CallAuth | None] = ContextVar("opscore_call_auth", default=None)


def current_call() -> CallAuth | None:
    return _call.get()


def set_current_call(auth: CallAuth) -> None:
    _call.set(auth)


def current_principal() -> Principal:
    """The principal of the RPC being served; `NOBODY` (allowed nothing) outside one."""
    auth = _call.get()
    return NOBODY if auth is None else auth.principal


def agent_not_allowed(
    principal: Principal, agent_id: str, field: str = "agent_id"
) -> PermissionDenied:
    if not agent_id:
        message = (
            f"principal {principal.name!r} acts only as the agents it is allowed "
            f"({', '.join(principal.agents or ())}): {field} must name one"
        )
    else:
        message = (
            f"principal {principal.name!r} may not act as agent {agent_id[:128]!r}; it is "
            f"allowed {', '.join(principal.agents or ()) or 'no agent ids'}"
        )
    return PermissionDenied(message, reason="AGENT_NOT_ALLOWED")


def require_agent(agent_id: str, field: str = "agent_id") -> None:
    """Refuse the current call unless its principal may act as `agent_id`."""
    auth = _call.get()
    principal = NOBODY if auth is None else auth.principal
    if not principal.allows_agent(agent_id):
        raise agent_not_allowed(principal, agent_id, field)
    if auth is not None and agent_id not in auth.agent_ids:
        auth.agent_ids.append(agent_id)
