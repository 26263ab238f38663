"""Security: principals and roles, API keys, the auth file, TLS, audit.

Enforcement lives in one place, opscore/api/interceptors.py; this package holds
what it decides with. Servicers ask who is calling with `current_principal()`
and refuse with `require_agent(agent_id)` (see opscore/security/principal.py).
docs/security.md is the user's guide and the threat model.
"""

from opscore.security.principal import (
    ANONYMOUS,
    Principal,
    current_principal,
    require_agent,
)
from opscore.security.roles import Role

__all__ = ["ANONYMOUS", "Principal", "Role", "current_principal", "require_agent"]
