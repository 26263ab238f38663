"""W3C Trace Context strings, without OpenTelemetry (engines and convert use it).

An attempt's span id is derived from its task's span and the attempt number, so
every party computes the same id without storing it: the assignment re-sent
after a reconnect or a server restart carries the same parent, and the server
can end the attempt's span after a restart with the id the agent already used.
"""

from __future__ import annotations

import hashlib

_HEX = frozenset("0123456789abcdef")


def parse(traceparent: str) -> tuple[str, str, str] | None:
    """(trace_id, span_id, flags) of a version-00 traceparent, or None if invalid."""
    if len(traceparent) < 55:
        return None
    version, trace_id, span_id, flags = (
        traceparent[:2],
        traceparent[3:35],
        traceparent[36:52],
        traceparent[53:55],
    )
    if (
        traceparent[2] != "-"
        or traceparent[35] != "-"
        or traceparent[52] != "-"
        or version == "ff"
        or not set(version + trace_id + span_id + flags) <= _HEX
        or trace_id == "0" * 32
        or span_id == "0" * 16
        or (version == "00" and len(traceparent) != 55)
    ):
        return None
    return trace_id, span_id, flags


def format_traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def attempt_span_id(task_traceparent: str, attempt: int) -> str:
    digest = hashlib.sha256(f"{task_traceparent[36:52]}/{attempt}".encode()).hexdigest()
    return digest[:16] if digest[:16] != "0" * 16 else "0" * 15 + "1"


def attempt_traceparent(task_traceparent: str, attempt: int) -> str:
    """The traceparent of attempt `attempt`'s span ("" for an untraced task)."""
    parts = parse(task_traceparent) if task_traceparent else None
    if parts is None:
        return ""
    trace_id, _, flags = parts
    return format_traceparent(trace_id, attempt_span_id(task_traceparent, attempt), flags)


def trace_id_of(traceparent: str) -> str:
    parts = parse(traceparent) if traceparent else None
    return parts[0] if parts else ""
