"""Rows as PostgreSQL holds them: where its column types differ from SQLite's
(text arrays, booleans, jsonb sent as JSON text), on top of storage/rows.py's
codecs."""

from __future__ import annotations

import json
from typing import Any

from opscore.clock import from_micros, to_micros
from opscore.models import Agent, AgentState, StateTransition, Task
from opscore.storage import rows as R


def agent_row(a: Agent) -> tuple[Any, ...]:
    return (
        a.agent_id,
        a.name,
        a.version,
        list(a.capabilities),
        a.contact_endpoint,
        json.dumps(a.metadata, sort_keys=True),
        int(a.state),
        a.state_details,
        to_micros(a.register_time),
        to_micros(a.state_change_time),
        to_micros(a.last_seen_time),
        a.deregistered,
        int(a.state_before_offline),
        a.history_seq,
    )


def agent_from_row(r: Any, streams: int = 0) -> Agent:
    return Agent(
        agent_id=r[0],
        name=r[1],
        version=r[2],
        capabilities=tuple(r[3]),
        contact_endpoint=r[4],
        metadata=json.loads(r[5]),
        state=AgentState(r[6]),
        state_details=r[7],
        register_time=from_micros(r[8]),  # type: ignore[arg-type]
        state_change_time=from_micros(r[9]),  # type: ignore[arg-type]
        last_seen_time=from_micros(r[10]),  # type: ignore[arg-type]
        deregistered=r[11],
        state_before_offline=AgentState(r[12]),
        history_seq=r[13],
        open_subscriptions=streams,
    )


CANCEL_REQUESTED = 27  # position in rows.TASK_COLS


def task_row(t: Task) -> tuple[Any, ...]:
    row = list(R.task_row(t))
    row[CANCEL_REQUESTED] = bool(row[CANCEL_REQUESTED])
    return tuple(row)


def transition_row(t: StateTransition) -> tuple[Any, ...]:
    row = list(R.transition_row(t))
    row[8] = bool(row[8])
    return tuple(row)


def columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column: the arrays of an INSERT ... unnest."""
    return [list(col) for col in zip(*rows, strict=True)]
