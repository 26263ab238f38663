"""Every problem of one refused definition, in one error.

A person fixing a definition should see all of it at once, each problem once,
and the error must stay small: its message and BadRequest details travel in
gRPC trailers, which clients refuse past a few KiB. So the first
MAX_REPORTED_PROBLEMS are kept, the rest counted ("and 12 more").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opscore import limits
from opscore.errors import FieldViolation, InvalidArgument

_INDEX = re.compile(r"\[\d+\]$")
_NUMBERS = re.compile(r"\[(\d+)\]")


class Problems:
    def __init__(self, ignore: Iterable[str] = ()) -> None:
        self.kept: list[FieldViolation] = []
        self.total = 0
        # Fields already explained by an earlier, more precise problem (see
        # definitions.parse_source): a consequence is not reported again.
        self._ignore = frozenset(ignore)
        self._seen: set[int] = set()

    def add(self, field: str, description: str) -> None:
        if field in self._ignore or _INDEX.sub("", field) in self._ignore:
            return
        key = hash((field, description))
        if key in self._seen:
            return
        self._seen.add(key)
        self.total += 1
        if len(self.kept) < limits.MAX_REPORTED_PROBLEMS:
            self.kept.append(FieldViolation(field, _clip(description)))

    def absorb(self, other: Problems) -> None:
        """Add what `other` found (its kept problems, and the count of the rest)."""
        for v in other.kept:
            self.add(v.field, v.description)
        self.total += other.total - len(other.kept)

    @property
    def room(self) -> bool:
        """Whether another problem would be shown: callers skip costly hints when not."""
        return len(self.kept) < limits.MAX_REPORTED_PROBLEMS

    def __bool__(self) -> bool:
        return self.total > 0

    def error(self) -> InvalidArgument:
        # In document order (shape problems are found before validation's).
        kept = sorted(self.kept, key=_position)
        lines = [_line(v) for v in kept]
        if self.total == 1:
            message = lines[0]
        else:
            message = f"the workflow definition has {self.total} problems:" + "".join(
                f"\n  {line}" for line in lines
            )
            if self.total > len(lines):
                message += f"\n  and {self.total - len(lines)} more"
        return InvalidArgument(message, violations=kept)


def _position(v: FieldViolation) -> tuple[int, ...]:
    return tuple(int(n) for n in _NUMBERS.findall(v.field)[:1]) or (-1,)


def _line(v: FieldViolation) -> str:
    # Descriptions that already start with their path read better without it twice.
    if not v.field or v.description.startswith(v.field):
        return v.description
    return f"{v.field}: {v.description}"


def _clip(text: str) -> str:
    limit = limits.MAX_PROBLEM_CHARS
    return text if len(text) <= limit else text[: limit - 3] + "..."
