"""Errors raised by the Ops-Core client.

Every failed RPC raises a subclass of `OpsCoreError` chosen by its gRPC status
code. Each keeps what a caller needs to act on the failure:

- `code`: the `grpc.StatusCode`;
- `message`: the server's human-readable message;
- `reason`: the stable machine-readable reason from the status details
  (`google.rpc.ErrorInfo`, domain "opscore"), e.g. `"AGENT_NOT_FOUND"` or
  `"LEASE_LOST"`; empty when the server sent none (for example when it could
  not be reached);
- `request_id`: the `x-request-id` of the call, as echoed by the server (quote
  it when reporting a problem: every server log line of that call carries it);
- `field_violations`: for `InvalidArgumentError`, which request fields were
  wrong and why (`google.rpc.BadRequest`).

    try:
        await client.get_agent("nobody")
    except NotFoundError as exc:
        print(exc.reason, exc.request_id)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AlreadyExistsError",
    "CallCancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OpsCoreError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "connection_problem",
    "error_class",
    "error_from_rpc",
]

ERROR_DOMAIN = "opscore"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, from `google.rpc.BadRequest`."""

    field: str
    description: str


class OpsCoreError(Exception):
    """Base class of every error the client raises for a failed RPC."""

    #: The status code this class stands for (the actual code is in `code`).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        request_id: str = "",
        method: str = "",
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason = reason
        self.request_id = request_id
        self.method = method
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        extras = []
        if self.reason and self.reason != self.code.name:
            extras.append(f"reason {self.reason}")
        if self.request_id:
            extras.append(f"request id {self.request_id}")
        if extras:
            text += f" ({', '.join(extras)})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, "
            f"reason={self.reason!r}, request_id={self.request_id!r})"
        )


class InvalidArgumentError(OpsCoreError):
    """The request was malformed; `field_violations` says which fields."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(OpsCoreError):
    """The agent, task, definition or session does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(OpsCoreError):
    """A different resource already exists under that id (and version)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(OpsCoreError):
    """The resource is not in a state that allows the call: fix the state first.

    For results and heartbeats (`reason` "LEASE_LOST", "TASK_CANCELLED",
    "TASK_FINISHED") it means the attempt no longer counts and the result was
    ignored: do not retry.
    """

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(OpsCoreError):
    """The API key is missing, malformed or not recognised."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(OpsCoreError):
    """The API key is valid but may not make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(OpsCoreError):
    """A size or rate limit was hit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(OpsCoreError):
    """The server could not be reached or is draining: retry later.

    The client already retries this, with jittered backoff, for every call that
    is safe to repeat; seeing it means the retries ran out (or the call was not
    safe to repeat).
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(OpsCoreError):
    """The call did not finish within its timeout. Its effect may or may not have
    happened."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(OpsCoreError):
    """The server does not offer this RPC (an older server)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class CallCancelledError(OpsCoreError):
    """The call was cancelled (by the client, or the server ended it)."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(OpsCoreError):
    """A server bug (INTERNAL, UNKNOWN or DATA_LOSS); the request id finds it in the
    server log."""

    default_code = grpc.StatusCode.INTERNAL


_CLASS_BY_CODE: dict[grpc.StatusCode, type[OpsCoreError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnimplementedError,
        CallCancelledError,
        InternalError,
    )
}
_CLASS_BY_CODE[grpc.StatusCode.UNKNOWN] = InternalError
_CLASS_BY_CODE[grpc.StatusCode.DATA_LOSS] = InternalError


def error_class(code: grpc.StatusCode) -> type[OpsCoreError]:
    """The `OpsCoreError` subclass raised for a status code."""
    return _CLASS_BY_CODE.get(code, OpsCoreError)


def _metadata_value(metadata: object, key: str) -> str | bytes | None:
    for item in metadata or ():  # type: ignore[attr-defined]
        k, v = item
        if k == key:
            return v  # type: ignore[no-any-return]
    return None


def error_from_rpc(err: grpc.RpcError, *, request_id: str = "", method: str = "") -> OpsCoreError:
    """Translate a grpc error into the matching `OpsCoreError` subclass.

    `request_id` is the id the client sent; the one the server echoes in the
    trailing metadata wins when present.
    """
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message: str = (err.details() if hasattr(err, "details") else "") or ""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    echoed = _metadata_value(trailing, "x-request-id")
    if echoed:
        request_id = echoed.decode() if isinstance(echoed, bytes) else echoed
    reason = ""
    violations: list[FieldViolation] = []
    raw = _metadata_value(trailing, "grpc-status-details-bin")
    if isinstance(raw, bytes):
        try:
            status = status_pb2.Status.FromString(raw)
        except Exception:  # a malformed detail must not hide the error itself
            status = status_pb2.Status()
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
            elif detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                )
    cls = error_class(code)
    return cls(
        message or code.name.replace("_", " ").lower(),
        code=code,
        reason=reason,
        request_id=request_id,
        method=method,
        field_violations=violations,
    )


def connection_problem(
    exc: OpsCoreError,
    target: str,
    *,
    target_setting: str = "target= or OPSCORE_TARGET",
    api_key_setting: str = "api_key= or OPSCORE_API_KEY",
) -> str | None:
    """One line saying why `target` could not be used and which setting fixes it,
    for errors about the connection itself: the server unreachable (after the
    client's retries) or the API key missing or refused. None for any other
    error (the request itself was refused: show `str(exc)`).

    Programs pass their own option names, e.g.
    `target_setting="--target or OPSCORE_TARGET"`.
    """
    if isinstance(exc, UnauthenticatedError):
        if exc.reason == "API_KEY_MISSING":
            problem = f"the Ops-Core server at {target} requires an API key"
        elif exc.reason == "API_KEY_INVALID":
            problem = f"the Ops-Core server at {target} did not accept the API key"
        else:
            problem = f"the Ops-Core server at {target} refused the credentials ({exc.message})"
        return f"{problem}: set {api_key_setting}"
    if isinstance(exc, UnavailableError):
        detail = " ".join(exc.message.split())
        if "Connection refused" in detail or "connection refused" in detail:
            detail = "connection refused"
        return (
            f"cannot reach an Ops-Core server at {target} ({detail}): is it running? "
            f"Set {target_setting}"
        )
    return None
