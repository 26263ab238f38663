"""How a handler's exception becomes a task failure: its type, and details that
fit the server's limit."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from opscore.client.convert import to_struct
from opscore.limits import MAX_DETAILS_BYTES

# The failure details (traceback + the handler's own details) must stay within
# the server's limit, or the failure itself is refused and the attempt lingers
# until its lease ends. Characters of the traceback's tail kept at most:
_TRACEBACK_LIMIT = 16_000


def qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def failure_details(exc: BaseException, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The traceback, the exception's type and `extra` (a NonRetryableError's
    details), cut down to fit the server's limit on error details."""
    trace = "".join(traceback.format_exception(exc))
    details: dict[str, Any] = {"exception_type": qualified_name(exc)}
    try:
        to_struct(dict(extra), "details")
        details.update(extra)
    except TypeError as problem:
        details["details_error"] = f"the error's details were dropped: {problem}"
    details["traceback"] = trace[-_TRACEBACK_LIMIT:]
    while True:
        struct = to_struct(details, "details")
        assert struct is not None
        size = struct.ByteSize()
        if size <= MAX_DETAILS_BYTES:
            return details
        keep = len(details["traceback"]) - (size - MAX_DETAILS_BYTES) - 64
        if keep > 0:
            details["traceback"] = details["traceback"][-keep:]
        else:  # the handler's own details are too big: keep ours
            details = {
                "exception_type": details["exception_type"],
                "details_error": "the error's details were dropped: larger than "
                f"{MAX_DETAILS_BYTES} bytes",
                "traceback": trace[-_TRACEBACK_LIMIT // 2 :],
            }


class NonRetryableError(Exception):
    """Raise from a handler to fail the task for good: no further attempt.

    `error_type` replaces the class name as the error's type; `details` (a
    JSON-like dict) is sent with it.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.details = dict(details or {})
