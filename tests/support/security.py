"""Helpers for the security tests: principals written to a real auth file with
fresh keys, bearer metadata, and the ErrorInfo reason of a refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from opscore.security import authfile, keys
from opscore.security.roles import Role


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def principal(
    name: str,
    role: str,
    *,
    agents: list[str] | None = None,
    subject: str | None = None,
    key_hashes: tuple[str, ...] = (),
) -> authfile.Entry:
    return authfile.Entry(
        name, Role(role), tuple(agents) if agents is not None else None, subject, key_hashes
    )


def write_auth_file(path: Path, *entries: authfile.Entry, with_keys: bool = True) -> dict[str, str]:
    """Write `entries` to `path`, each given a fresh key (unless it has hashes or
    with_keys is False). Returns principal name -> key."""
    made: dict[str, str] = {}
    out = []
    for e in entries:
        if with_keys and not e.key_hashes:
            made[e.name] = keys.generate_key()
            e = e.with_key(keys.hash_key(made[e.name]))
        out.append(e)
    authfile.save(path, out)
    return made


def reason(err: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if none)."""
    md: Any = err.trailing_metadata() or ()  # type: ignore[union-attr]
    for k, v in md:
        if k == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(v)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""
