"""The edge's rule for U+0000 (NUL) in request strings: refused everywhere.

PostgreSQL cannot store NUL in `text` or `jsonb` (asyncpg raises
CharacterNotInRepertoireError), and a group commit fails as a whole: one agent
name with a NUL in it once failed the batch of every caller sharing its commit
and sent the server to rebuild its state, a denial of service any client could
repeat. SQLite stores it, but such a row could then never be copied to
PostgreSQL (`opscore db copy`). So no string field of a request may hold one,
on either backend, checked before anything runs.

google.protobuf.Struct payloads (task input and output, details, progress,
parameters) are exempt: they are stored as serialized bytes, returned byte for
byte, and JSON allows "\\u0000" in its strings.

In UTF-8 a NUL character is the byte 0x00 and nothing else (protobuf refuses
overlong encodings as invalid UTF-8), so a body without a zero byte, which is
most of them, costs one memchr and no walk.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from opscore.errors import InvalidArgument

# Stored as bytes, never as text: any character may be in them.
_PAYLOAD_TYPES = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def may_hold_nul(body: bytes) -> bool:
    """False when no string decoded from `body` can hold a NUL character."""
    return b"\x00" in body


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string field of `message` (at any depth, payloads
    excepted) that holds a NUL character, as `tasks[2].name` or
    `metadata["key"]`; None when there is none."""
    for fd, value in message.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.type == _STRING:
            found = _in_strings(path, value if fd.is_repeated else (value,), fd.is_repeated)
        elif fd.type != _MESSAGE or fd.message_type.full_name in _PAYLOAD_TYPES:
            continue
        elif fd.message_type.GetOptions().map_entry:
            found = _in_map(path, value, fd.message_type)
        elif fd.is_repeated:
            found = next(
                (f for i, m in enumerate(value) if (f := nul_field(m, f"{path}[{i}]."))), None
            )
        else:
            found = nul_field(value, f"{path}.")
        if found is not None:
            return found
    return None


def _in_strings(path: str, values: Any, indexed: bool) -> str | None:
    for i, s in enumerate(values):
        if "\x00" in s:
            return f"{path}[{i}]" if indexed else path
    return None


def _in_map(path: str, mapping: Any, entry: Any) -> str | None:
    key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for key, value in mapping.items():
        where = f"{path}[{key!r}]"
        if key_fd.type == _STRING and "\x00" in key:
            return f"{path} key {key!r}"
        if value_fd.type == _STRING and "\x00" in value:
            return where
        if value_fd.type == _MESSAGE and value_fd.message_type.full_name not in _PAYLOAD_TYPES:
            found = nul_field(value, f"{where}.")
            if found is not None:
                return found
    return None


def nul_error(path: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path} contains the NUL character (U+0000), which no string field may hold; "
        "remove it (binary data belongs in a payload or must be encoded, e.g. as base64)",
        field=path,
        reason="NUL_CHARACTER",
    )


def check_request(body: bytes, message: Message) -> None:
    """Refuse `message` (decoded from `body`) if any of its strings holds a NUL."""
    if may_hold_nul(body):
        path = nul_field(message)
        if path is not None:
            raise nul_error(path)
