"""Paging shared by the backends: opaque page tokens and pages cut to fit a
response's byte budget."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from opscore import limits
from opscore.errors import InvalidArgument
from opscore.models import Agent


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


_INT64 = (-(2**63), 2**63 - 1)


def decode_cursor(token: str, *types: type) -> list[Any]:
    """The values of a page token this server issued, each of the type given.

    Anything else (forged, truncated, from another list, absurdly large) is the
    client's mistake and gets INVALID_ARGUMENT, never a crash in the query.
    """
    try:
        if len(token) > limits.MAX_PAGE_TOKEN_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != len(types):
            raise ValueError("wrong shape")
        for value, kind in zip(values, types, strict=True):
            if type(value) is not kind:
                raise ValueError("wrong type")
            if kind is int and not _INT64[0] <= value <= _INT64[1]:
                raise ValueError("out of range")
        return values
    except (ValueError, TypeError, RecursionError, binascii.Error) as exc:
        raise InvalidArgument(
            "page_token is not one this server issued for this list; pass "
            "next_page_token unchanged, or leave it empty for the first page",
            field="page_token",
        ) from exc


def clamp_page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return 100 if page_size == 0 else min(page_size, 1000)


def fit(sizes: Iterable[int], budget: int) -> int:
    """How many leading items fit in `budget` bytes (always at least one)."""
    used = n = 0
    for size in sizes:
        used += size + 64  # the message's own fields, ids and times
        if n and used > budget:
            break
        n += 1
    return n


def nbytes(*values: bytes | str | None) -> int:
    return sum(len(v) for v in values if v)


def agent_size(a: Agent) -> int:
    """About what an Agent message takes on the wire, to cut pages to fit."""
    return (
        200
        + len(a.agent_id)
        + len(a.name)
        + len(a.version)
        + len(a.contact_endpoint)
        + sum(len(c) + 2 for c in a.capabilities)
        + sum(len(k) + len(val) + 4 for k, val in a.metadata.items())
        + len(a.state_details or b"")
    )


def latest_definitions_sql(after: str, limit: str) -> str:
    """The latest version of a page of workflow definitions, by id, with the
    backend's placeholders for the cursor and the page size. The page's ids come
    first, in the primary key's order and stopping after the page, then their
    latest bodies: not the latest version of every id after the cursor, sorted."""
    return (
        "SELECT d.definition_id, d.body FROM (SELECT definition_id, MAX(version) AS v "
        f"FROM workflow_definitions WHERE definition_id > {after} GROUP BY definition_id "
        f"ORDER BY definition_id LIMIT {limit}) m JOIN workflow_definitions d "
        "ON d.definition_id = m.definition_id AND d.version = m.v ORDER BY d.definition_id"
    )
