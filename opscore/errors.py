"""Domain errors. The engines raise these; opscore.api.errors maps them to gRPC status
codes, in one table. Nothing here knows about gRPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class OpsCoreError(Exception):
    """Base of every error a client can cause. `reason` is stable (UPPER_SNAKE_CASE)."""

    reason = "OPSCORE_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason


class InvalidArgument(OpsCoreError):
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        violations: list[FieldViolation] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations or [])
        if field is not None and not self.violations:
            self.violations.append(FieldViolation(field, message))


class NotFound(OpsCoreError):
    reason = "NOT_FOUND"


class AlreadyExists(OpsCoreError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(OpsCoreError):
    reason = "FAILED_PRECONDITION"


class Unauthenticated(OpsCoreError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(OpsCoreError):
    reason = "PERMISSION_DENIED"


class ResourceExhausted(OpsCoreError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(OpsCoreError):
    """The server is draining or storage cannot commit: the client may retry."""

    reason = "UNAVAILABLE"


class ConfigError(Exception):
    """Invalid server configuration; `opscore serve` prints it and exits 2."""
