"""What a caller asks to enqueue (a task, its retry policy), before the dispatch
engine validates it and fills in the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from opscore import limits
from opscore import validation as v
from opscore.errors import InvalidArgument
from opscore.models import RetryPolicy
from opscore.payload import Payload


@dataclass(slots=True, frozen=True)
class RetryPolicySpec:
    """A retry policy as requested: zero/None fields take the defaults."""

    max_attempts: int = 0
    initial_backoff: timedelta | None = None
    backoff_multiplier: float = 0.0
    max_backoff: timedelta | None = None

    def resolve(self, field: str = "retry_policy") -> RetryPolicy:
        d = RetryPolicy()
        if not 0 <= self.max_attempts <= limits.MAX_ATTEMPTS:
            raise InvalidArgument(
                f"{field}.max_attempts must be between 1 and {limits.MAX_ATTEMPTS} "
                "(0 for the default 3)",
                field=f"{field}.max_attempts",
            )
        v.duration(self.initial_backoff, f"{field}.initial_backoff", limits.MAX_BACKOFF)
        v.duration(self.max_backoff, f"{field}.max_backoff", limits.MAX_BACKOFF)
        m = self.backoff_multiplier
        if m != 0.0 and not 1.0 <= m <= limits.MAX_BACKOFF_MULTIPLIER:  # NaN fails both
            raise InvalidArgument(
                f"{field}.backoff_multiplier must be between 1.0 and "
                f"{limits.MAX_BACKOFF_MULTIPLIER:g} (0 for the default 2.0), got {m!r}",
                field=f"{field}.backoff_multiplier",
            )
        initial = d.initial_backoff if self.initial_backoff is None else self.initial_backoff
        maximum = d.max_backoff if self.max_backoff is None else self.max_backoff
        if self.max_backoff is not None and maximum < initial:
            raise InvalidArgument(
                f"{field}.max_backoff must not be smaller than initial_backoff",
                field=f"{field}.max_backoff",
            )
        return RetryPolicy(
            max_attempts=self.max_attempts or d.max_attempts,
            initial_backoff=initial,
            backoff_multiplier=self.backoff_multiplier or d.backoff_multiplier,
            max_backoff=max(maximum, initial),
        )


@dataclass(slots=True)
class TaskSpec:
    """What a caller asks to enqueue, before validation and defaults. Not
    frozen: one is made per task enqueued, and a frozen dataclass pays a
    object.__setattr__ call per field (2.5 against 0.55 us for the 14 fields).
    Nothing changes one after it is made; dataclasses.replace makes a copy."""

    name: str = ""
    capability: str = ""
    agent_id: str = ""
    input: Payload = None
    priority: int = 0
    schedule_time: datetime | None = None
    delay: timedelta | None = None
    retry_policy: RetryPolicySpec = RetryPolicySpec()
    timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    idempotency_key: str = ""
    session_id: str = ""
    workflow_task_id: str = ""
    # The traceparent the task's spans go under ("": the enqueuing call's).
    trace_parent: str = ""
