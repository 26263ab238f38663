"""Hostile values, by protobuf field type, and documents built to hurt a parser.

Plain functions and constants, used by the fuzz suite's strategies and by the
hardening regression tests alike, so both test the same edges.
"""

from __future__ import annotations

import base64
import json
import math

from opscore import limits

# ------------------------------------------------------------------ scalars

INT32_EXTREMES = (0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 2, -(2**31) + 1)
INT64_EXTREMES = (0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 2**53 + 1)
UINT32_EXTREMES = (0, 1, 2**32 - 1, 2**31)
UINT64_EXTREMES = (0, 1, 2**64 - 1, 2**63)
DOUBLE_EXTREMES = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -5e-324,
    0.0,
    -0.0,
    0.5,
    0.999999,
    1.0,
    2.0,
    limits.MAX_BACKOFF_MULTIPLIER,
    limits.MAX_BACKOFF_MULTIPLIER + 1e-9,
    1e16,
)
# Enum numbers no enum of the contract defines (proto3 enums are open: they arrive).
UNKNOWN_ENUM_NUMBERS = (-1, 99, 2**31 - 1, -(2**31), 1000)

HOSTILE_STRINGS = (
    "",
    " ",
    "x",
    "\x00",
    "a\x00b",
    "\n\r\t",
    "名前",
    "🚀" * 10,
    "\u202eevil",
    "\ufeff",
    "../../etc/passwd",
    "' OR 1=1 --",
    "%s%n%x",
    "${jndi:ldap://x}",
    "a" * (limits.MAX_ID_CHARS + 1),
    "a" * (limits.MAX_NAME_CHARS + 1),
    "a" * (limits.MAX_REASON_CHARS + 1),
    "a" * (limits.MAX_ERROR_MESSAGE_CHARS + 1),
    "é" * 5000,
)
# Lengths of the huge strings drawn: past every limit, and past the payload limit.
HUGE_STRING_LENGTHS = (70_000, 1_100_000)

# ------------------------------------------------------------------ times

TIMESTAMP_SECONDS_BAD = (
    limits.MIN_TIMESTAMP_SECONDS - 1,
    limits.MAX_TIMESTAMP_SECONDS + 1,
    2**62,
    -(2**62),
    2**63 - 1,
    -(2**63),
)
TIMESTAMP_SECONDS_EDGE = (limits.MIN_TIMESTAMP_SECONDS, limits.MAX_TIMESTAMP_SECONDS, 0, -1)
NANOS_BAD = (-1, 1_000_000_000, 2**31 - 1, -(2**31))
NANOS_EDGE = (0, 1, 999_999_999)

DURATION_SECONDS_BAD = (
    2**62,
    -(2**62),
    2**63 - 1,
    -(2**63),
    300_000_000_000,
    limits.MAX_DURATION_SECONDS + 1,
    -(limits.MAX_DURATION_SECONDS + 1),
)
DURATION_SECONDS_EDGE = (
    0,
    1,
    -1,
    limits.MAX_DURATION_SECONDS,
    int(limits.MAX_TASK_TIMEOUT.total_seconds()) + 1,
    int(limits.MAX_DELAY.total_seconds()) + 1,
    int(limits.MAX_BACKOFF.total_seconds()) + 1,
)

# ------------------------------------------------------------------ page tokens


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unissuable_page_tokens() -> list[str]:
    """Tokens no list of this server can have issued: they do not decode, or
    decode to something that is not a one-element list of a string or an
    integer in range (deep nesting, NaN-ish and huge numbers, objects...)."""
    deep = "[" * 5000 + "]" * 5000
    bodies = [
        b"[{}]",
        b"[1e400]",
        b"[-1e400]",
        b"[NaN]",
        b"[null]",
        b"[[1]]",
        b"[" + str(2**70).encode() + b"]",
        b"[" + b"9" * 5000 + b"]",
        deep.encode(),
        b"[]",
        b'[1, "x"]',
        b"{}",
        b'"x"',
        b"\xff\xfe\x00garbage",
    ]
    tokens = [b64(b) for b in bodies]
    tokens += ["!!!not-base64!!!", "a", "\x00", "é", "A" * (limits.MAX_PAGE_TOKEN_CHARS + 1)]
    return tokens


# Well-formed but never issued: a server that does not sign its tokens may take
# these for real cursors of some list (a string one, an integer one), so only
# "no INTERNAL" is asked of them.
PLAUSIBLE_FORGED_PAGE_TOKENS = tuple(b64(b) for b in (b'["x"]', b"[true]", b"[1.5]", b"[-1]"))
UNISSUABLE_PAGE_TOKENS = tuple(unissuable_page_tokens())
FORGED_PAGE_TOKENS = UNISSUABLE_PAGE_TOKENS + PLAUSIBLE_FORGED_PAGE_TOKENS

# ------------------------------------------------------------------ documents


def deep_json(depth: int) -> str:
    """A definition whose parameters nest `depth` JSON arrays."""
    return (
        '{"id": "deep", "tasks": [{"id": "t", "capability": "c", "parameters": {"p": '
        + ("[" * depth + "]" * depth)
        + "}}]}"
    )


def deep_json_bare(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_yaml_flow(depth: int) -> str:
    return "id: deep\ntasks: " + "[" * depth + "]" * depth + "\n"


def deep_yaml_block(depth: int) -> str:
    """Nested block mappings, each level indented one more space."""
    lines = ["id: deep", "tasks:", "  - id: t", "    capability: c", "    parameters:"]
    for i in range(depth):
        lines.append(" " * (6 + i) + "k:")
    lines.append(" " * (6 + depth) + "v")
    return "\n".join(lines) + "\n"


def billion_laughs(levels: int = 8, width: int = 9) -> str:
    """YAML whose aliases expand to width**levels strings inside a task's
    parameters, where the definition's own format accepts any data. About 500
    bytes for the default 8 levels (43 million strings once expanded)."""
    lines = [
        "id: laughs",
        "tasks:",
        "- id: t",
        "  capability: c",
        "  parameters:",
        "    a: &a [" + ",".join(["lol"] * width) + "]",
    ]
    prev = "a"
    for i in range(1, levels):
        name = chr(ord("a") + i)
        lines.append(f"    {name}: &{name} [" + ",".join([f"*{prev}"] * width) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def large_yaml_definition(n_tasks: int = limits.MAX_WORKFLOW_TASKS, *, chain: bool = True) -> str:
    """A valid definition of `n_tasks` steps: a chain (each depends on the one
    before) or wide (all independent)."""
    lines = ["id: large", "name: a large definition", "tasks:"]
    for i in range(n_tasks):
        lines.append(f"- id: step-{i:05d}")
        lines.append("  capability: work")
        lines.append(f"  name: step number {i}")
        if chain and i:
            lines.append(f"  depends_on: [step-{i - 1:05d}]")
    return "\n".join(lines) + "\n"


NAN_JSON_SOURCE = json.dumps(
    {
        "id": "nan-json",
        "tasks": [{"id": "t", "capability": "c", "retry_policy": {"backoff_multiplier": math.nan}}],
    }
)

GARBAGE_SOURCES = (
    "{",
    "[",
    "}{",
    "id: [unclosed",
    ": : :",
    "\x00\x01\x02",
    "!!python/object/apply:os.system ['true']",
    "id: x\ntasks: !!set {a, b}",
    "id: 2001-12-14\ntasks: []",
    "id: !!binary aGVsbG8=\ntasks: []",
    "id: x\ntasks:\n- id: t\n  capability: c\n  timeout: 1e400",
    "id: x\ntasks:\n- id: t\n  capability: c\n  timeout: 300000000000s",
    "id: x\ntasks:\n- id: t\n  capability: c\n  timeout: .nan",
    "id: x\ntasks:\n- id: t\n  capability: c\n  retry_policy: {backoff_multiplier: .inf}",
    "id: x\nversion: 99999999999999999999\ntasks: []",
    "base: &b {id: t, capability: c}\nid: x\ntasks: [{<<: *b}]",
    NAN_JSON_SOURCE,
    '{"id": "x", "tasks": [{"id": "t", "capability": "c", "timeout": 1e400}]}',
    '{"taskId": 1, "tasks": [{"taskId": {"a": 1}, "nextTaskId": [1]}]}',
    '{"tasks": [{"taskId": "a", "nextTaskId": "a"}]}',
)
