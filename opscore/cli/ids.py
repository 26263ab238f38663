"""Short ids for people: tables show 8 characters of generated ids, and every
command that takes an id also takes a unique prefix of one, or the short id shown.

Ids the server makes now are time-ordered (version 7 UUIDs, opscore/ids.py): their
first characters are a timestamp that every id of the same minute shares, so
their short form is their last 8 characters, which are random. Older, random
(version 4) ids still show their first 8.

A value is first tried as a whole id (one Get call); only when no such thing
exists is it resolved as a prefix (or the end of a time-ordered id), through the
List calls (the API has no prefix search). Tasks and sessions are scanned newest
first, at most `SCAN_LIMIT`; a value that matches several ids is refused with the
candidates listed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2, workflow_pb2

from opscore.cli.common import CommandFailed
from opscore.client import OpsCoreClient
from opscore.client.errors import NotFoundError

T = TypeVar("T")

#: Characters of a generated id shown in tables (as unique as git's 7-8).
SHORT_ID_CHARS = 8
#: Newest tasks or sessions scanned to resolve a prefix.
SCAN_LIMIT = 10_000
#: Candidates listed when a prefix is ambiguous.
SHOW_CANDIDATES = 5

_GENERATED = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _time_ordered(value: str) -> bool:
    return _GENERATED.match(value) is not None and value[14] == "7"


def short_id(value: str) -> str:
    """The last characters of a time-ordered id, the first of an older generated
    (UUID) one; other ids as they are."""
    if _time_ordered(value):
        return value[-SHORT_ID_CHARS:]
    return value[:SHORT_ID_CHARS] if _GENERATED.match(value) else value


def _matches(candidate: str, value: str) -> bool:
    # The end of an id only counts for time-ordered ones: matching the end of a
    # name someone chose ("1" for "worker-1") would surprise.
    return candidate.startswith(value) or (candidate.endswith(value) and _time_ordered(candidate))


async def _resolve(
    value: str,
    what: str,
    get: Callable[[str], Awaitable[T]],
    ids: AsyncIterator[str],
) -> T:
    """What `value` names: the thing with that id, or the one whose id it is
    the start of."""
    try:
        return await get(value)
    except NotFoundError as exc:
        if not value:
            raise
        not_found = exc
    matches: list[str] = []
    async for candidate in ids:
        if _matches(candidate, value):
            matches.append(candidate)
            if len(matches) > SHOW_CANDIDATES:
                break
    if len(matches) == 1:
        return await get(matches[0])
    if not matches:
        # Nothing starts with it either: the server's own answer says it best.
        raise not_found
    listed = ", ".join(matches[:SHOW_CANDIDATES])
    more = " and more" if len(matches) > SHOW_CANDIDATES else ""
    raise CommandFailed(
        f"{value!r} is the start (or short id) of several {what} ids: {listed}{more}; "
        "give more characters"
    )


async def _scan(items: AsyncIterator[T], key: Callable[[T], str]) -> AsyncIterator[str]:
    async for item in items:
        yield key(item)


async def agent(client: OpsCoreClient, value: str) -> lifecycle_pb2.Agent:
    return await _resolve(
        value,
        "agent",
        client.get_agent,
        _scan(client.iter_agents(page_size=1000), lambda a: a.agent_id),
    )


async def task(client: OpsCoreClient, value: str) -> dispatch_pb2.Task:
    return await _resolve(
        value,
        "task",
        client.get_task,
        _scan(client.iter_tasks(limit=SCAN_LIMIT, page_size=1000), lambda t: t.task_id),
    )


async def session(client: OpsCoreClient, value: str) -> workflow_pb2.Session:
    return await _resolve(
        value,
        "session",
        client.get_session,
        _scan(client.iter_sessions(limit=SCAN_LIMIT, page_size=1000), lambda s: s.session_id),
    )


async def definition(
    client: OpsCoreClient, value: str, version: int = 0
) -> workflow_pb2.WorkflowDefinition:
    return await _resolve(
        value,
        "workflow definition",
        lambda v: client.get_workflow_definition(v, version),
        _scan(client.iter_workflow_definitions(page_size=1000), lambda d: d.id),
    )


async def agent_filter(client: OpsCoreClient, value: str) -> str:
    """An agent id given as a filter or a pin: "" stays "" (no filter)."""
    return (await agent(client, value)).agent_id if value else ""


async def session_filter(client: OpsCoreClient, value: str) -> str:
    return (await session(client, value)).session_id if value else ""
