"""A JSON/YAML definition checked against the contract's message shape, in the
words its author wrote.

protobuf's json_format stops at the first problem and speaks of itself
(`Message type "opscore.v1.WorkflowTask" has no field named "retries"`, with
camelCase names and output-only fields). This walks the parsed document along
the message descriptors instead and reports every problem with its path
(`tasks[2].retries`), the proto's snake_case names, a "did you mean" for
unknown fields, and what was expected for values of the wrong kind. It also
takes the forms people write where the JSON mapping is strict: durations with
units (opscore.durations), and a single task id for `depends_on`.

The result is the document in the JSON mapping's own form (json_format then
parses it without complaint); values with problems are left out of it, so the
rest can still be validated.
"""

from __future__ import annotations

import difflib
import functools
import re
from datetime import date, datetime, timedelta
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opscore_proto.v1 import workflow_pb2

from opscore import durations
from opscore.workflow.problems import Problems

_DURATION = "google.protobuf.Duration"
_STRUCT = "google.protobuf.Struct"

# Set by the server. Accepted in a source so that a definition read back
# (`opscore workflows get --json`) can be stored again, and ignored.
_OUTPUT_ONLY = frozenset({"opscore.v1.WorkflowDefinition.create_time"})

# What each message is called in messages.
_NOUN = {
    "opscore.v1.WorkflowDefinition": "a workflow definition",
    "opscore.v1.WorkflowTask": "a task",
    "opscore.v1.RetryPolicy": "a retry_policy",
}

# Names other tools use (or that people guess) for our fields; difflib alone
# would not connect "retries" with a retry policy or "needs" with depends_on.
_ALIASES: dict[str, dict[str, str]] = {
    "opscore.v1.WorkflowDefinition": {
        "steps": "tasks",
        "jobs": "tasks",
        "workflow_id": "id",
        "title": "name",
    },
    "opscore.v1.WorkflowTask": {
        "retries": "retry_policy: {max_attempts: N}",
        "max_retries": "retry_policy: {max_attempts: N}",
        "max_attempts": "retry_policy: {max_attempts: N}",
        "retry": "retry_policy",
        "needs": "depends_on",
        "deps": "depends_on",
        "after": "depends_on",
        "requires": "depends_on",
        "dependencies": "depends_on",
        "params": "parameters",
        "args": "parameters",
        "input": "parameters",
        "agent": "agent_id",
        "capabilities": "capability",
        "task_id": "id",
        "timeout_seconds": "timeout",
        "heartbeat": "heartbeat_timeout",
        "on_failure": "fallback",
    },
    "opscore.v1.RetryPolicy": {
        "attempts": "max_attempts",
        "retries": "max_attempts",
        "backoff": "initial_backoff",
        "multiplier": "backoff_multiplier",
    },
}

# What a list field holds, for "expected ..." messages.
_LIST_OF = {
    "opscore.v1.WorkflowDefinition.tasks": "a list of tasks (each `- id: ...` with its fields)",
    "opscore.v1.WorkflowTask.depends_on": "a list of task ids, e.g. [fetch, parse]",
}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)

_MICRO = timedelta(microseconds=1)
_BAD = object()  # a value with a problem: left out of the result
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class Mapping(dict[Any, Any]):
    """A parsed JSON object or YAML mapping that remembers keys it had twice
    (both parsers keep the last value silently)."""

    __slots__ = ("duplicates",)

    def __init__(self, *args: Any, duplicates: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.duplicates = duplicates


def json_object(pairs: list[tuple[str, Any]]) -> Mapping:
    """json.loads' object_pairs_hook."""
    seen: set[str] = set()
    dups: list[str] = []
    for key, _ in pairs:
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
    return Mapping(pairs, duplicates=tuple(dups))


class Shape:
    """One walk over one document; `covered` are the fields whose problems are
    already explained (so validation does not report their consequences)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.covered: set[str] = set()

    def definition(self, data: dict[str, Any]) -> dict[str, Any]:
        out = self._message(data, workflow_pb2.WorkflowDefinition.DESCRIPTOR, "", "")
        return out if isinstance(out, dict) else {}

    def _bad(self, path: str, who: str, description: str) -> object:
        self.problems.add(path, f"{who}: {description}" if who else description)
        self.covered.add(path)
        return _BAD

    # ------------------------------------------------------------ messages

    def _message(self, value: Any, desc: Descriptor, path: str, who: str) -> Any:
        if not isinstance(value, dict):
            return self._bad(
                path, who, f"expected {_NOUN.get(desc.full_name, 'a mapping')}, got {_kind(value)}"
            )
        if desc.full_name == "opscore.v1.WorkflowTask":
            ident = value.get("id")
            who = f"task {ident!r}" if isinstance(ident, str) and ident else who
        for key in getattr(value, "duplicates", ()):
            self._bad(
                _join(path, key),
                who,
                f"{_name(key)} is given twice; only the last one would count",
            )
        by_key = _fields_by_key(desc)
        out: dict[str, Any] = {}
        written_as: dict[str, str] = {}
        for key, item in value.items():
            fd = by_key.get(key) if isinstance(key, str) else None
            if fd is None:
                self._unknown(key, desc, path, who)
                continue
            if fd.full_name in _OUTPUT_ONLY:
                continue
            where = _join(path, fd.name)
            if fd.name in written_as:
                self._bad(where, who, f"given twice, as {written_as[fd.name]} and {key}")
                continue
            written_as[fd.name] = key
            if item is None:  # `timeout:` with nothing after it: unset
                continue
            converted = self._field(item, fd, where, who)
            if converted is not _BAD:
                out[fd.name] = converted
        return out

    def _unknown(self, key: Any, desc: Descriptor, path: str, who: str) -> None:
        where = _join(path, key if isinstance(key, str) else str(key))
        names = [fd.name for fd in desc.fields if fd.full_name not in _OUTPUT_ONLY]
        text = f"unknown field {_name(key)}"
        if not self.problems.room:
            self._bad(where, who, text)
            return
        guess = _suggest(key, desc.full_name, names) if isinstance(key, str) else None
        if guess is not None:
            field = guess.split(":")[0]
            self.covered.add(_join(path, field))
            if field == "agent_id":  # "has neither capability nor agent_id"
                self.covered.add(_join(path, "capability"))
            self._bad(where, who, f"{text}; did you mean {guess}?")
        else:
            noun = _NOUN.get(desc.full_name, desc.name)
            self._bad(where, who, f"{text}; the fields of {noun} are {', '.join(names)}")

    # ------------------------------------------------------------ fields

    def _field(self, value: Any, fd: FieldDescriptor, path: str, who: str) -> Any:
        if not fd.is_repeated:
            return self._single(value, fd, path, who)
        if not isinstance(value, list):
            if fd.type == FieldDescriptor.TYPE_STRING and isinstance(value, str):
                value = [value]  # `depends_on: fetch` means [fetch]
            else:
                expected = _LIST_OF.get(fd.full_name, "a list")
                return self._bad(path, who, f"expected {expected}, got {_kind(value)}")
        out = []
        for j, item in enumerate(value):
            converted = self._single(item, fd, f"{path}[{j}]", who)
            if converted is not _BAD:
                out.append(converted)
        return out

    def _single(self, value: Any, fd: FieldDescriptor, path: str, who: str) -> Any:
        t = fd.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            kind = fd.message_type.full_name
            if kind == _DURATION:
                return self._duration(value, path, who)
            if kind == _STRUCT:
                if not isinstance(value, dict):
                    return self._bad(path, who, f"expected a mapping, got {_kind(value)}")
                return value if self._json_like(value, path, who) else _BAD
            return self._message(value, fd.message_type, path, who)
        if t == FieldDescriptor.TYPE_STRING:
            if isinstance(value, str):
                return value
            hint = f" (quote it: '{value}')" if _is_number(value) else ""
            return self._bad(path, who, f"expected a string, got {_kind(value)}{hint}")
        if t in _INT_RANGES:
            return self._integer(value, _INT_RANGES[t], path, who)
        if t in _FLOATS:
            if _is_number(value):
                try:
                    return float(value)
                except OverflowError:
                    pass
            return self._bad(path, who, f"expected a number, got {_kind(value)}")
        if t == FieldDescriptor.TYPE_BOOL:
            if isinstance(value, bool):
                return value
            return self._bad(path, who, f"expected true or false, got {_kind(value)}")
        return value  # enums and bytes: json_format has the words for those

    def _integer(self, value: Any, bounds: tuple[int, int], path: str, who: str) -> Any:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if number is None:
            return self._bad(path, who, f"expected a whole number, got {_kind(value)}")
        low, high = bounds
        if not low <= number <= high:
            return self._bad(path, who, f"{number} is out of range ({low} to {high})")
        return number

    def _duration(self, value: Any, path: str, who: str) -> Any:
        try:
            td = durations.parse_duration(value)
        except durations.DurationError as exc:
            return self._bad(path, who, str(exc))
        return _duration_json(td)

    def _json_like(self, value: Any, path: str, who: str) -> bool:
        """A Struct's content: JSON values only (YAML also makes dates, sets...)."""
        ok = True
        if isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                self._bad(_join(path, key), who, f"{_name(key)} is given twice")
                ok = False
            for key, item in value.items():
                if not isinstance(key, str):
                    self._bad(
                        _join(path, str(key)),
                        who,
                        f"keys must be strings, not {_kind(key)} (quote it: '{key}')",
                    )
                    ok = False
                elif not self._json_like(item, _join(path, key), who):
                    ok = False
        elif isinstance(value, list):
            for j, item in enumerate(value):
                if not self._json_like(item, f"{path}[{j}]", who):
                    ok = False
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                self._bad(path, who, "the number is too large for JSON (a double)")
                return False
        elif value is not None and not isinstance(value, str | float | bool):
            hint = " (quote it to pass it as a string)" if isinstance(value, date) else ""
            self._bad(path, who, f"{_kind(value)} is not JSON-like{hint}")
            return False
        return ok


@functools.cache
def _fields_by_key(desc: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by proto name and by JSON (camelCase) name: json_format
    accepts both, so both stay accepted."""
    by_key: dict[str, FieldDescriptor] = {}
    for fd in desc.fields:
        by_key[fd.name] = by_key[fd.json_name] = fd
    return by_key


def _suggest(key: str, message: str, names: list[str]) -> str | None:
    plain = _CAMEL.sub("_", key.strip()).lower().replace("-", "_").replace(" ", "_")
    if plain in names:
        return plain
    alias = _ALIASES.get(message, {}).get(plain)
    if alias is not None:
        return alias
    close = difflib.get_close_matches(plain, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _duration_json(td: timedelta) -> str:
    """The JSON mapping's form of a Duration ("300s", "-0.500s")."""
    micros = td // _MICRO
    sign = "-" if micros < 0 else ""
    seconds, rest = divmod(abs(micros), 1_000_000)
    return f"{sign}{seconds}.{rest:06d}s" if rest else f"{sign}{seconds}s"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _name(key: Any) -> str:
    text = repr(key) if isinstance(key, str) else str(key)
    return text if len(text) <= 66 else text[:63] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= 24 else text[:21] + '...'}"
    if isinstance(value, str):
        return f"the string {_name(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime):
        return "a date and time"
    if isinstance(value, date):
        return "a date"
    return f"a {type(value).__name__}"
