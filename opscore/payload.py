"""Free-form payloads (task input/output, details) travel as google.protobuf.Struct.

Inside the engines a payload is the Struct's serialized bytes: storing, copying and
sending it then costs no per-field work. `None` means "not set".
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

Payload = bytes | None


def to_struct(payload: Payload) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if payload:
        s.ParseFromString(payload)
    return s


def from_struct(s: struct_pb2.Struct | None) -> Payload:
    if s is None:
        return None
    return s.SerializeToString(deterministic=True)


def from_dict(d: dict[str, Any] | None) -> Payload:
    if d is None:
        return None
    s = struct_pb2.Struct()
    s.update(d)
    return s.SerializeToString(deterministic=True)


def to_dict(payload: Payload) -> dict[str, Any] | None:
    if payload is None:
        return None
    return json_format.MessageToDict(to_struct(payload))
