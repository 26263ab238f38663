"""Free-form payloads (task input/output, details) travel as google.protobuf.Struct.

Inside the engines a payload is the Struct's serialized bytes: storing, copying and
sending it then costs no per-field work. `None` means "not set".
"""

from __future__ import annotations

Payload = bytes | None
