"""The auth file: the principals a server accepts, in YAML or TOML (by extension).

    # opscore-auth.toml
    [[principals]]
    name = "summarizer-fleet"
    role = "agent"                      # admin | operator | agent | viewer
    agents = ["summarizer-*"]           # agent role only: the agent ids it may act as
    key_hashes = ["sha256:9f86d0..."]   # hashes of its keys (opscore auth create-key)

    [[principals]]
    name = "ci"
    role = "operator"
    subject = "O=Acme,CN=ci"            # with mTLS: a client certificate's subject

The same in YAML is a mapping with a `principals:` list. Keys are never stored,
only their hashes (opscore.security.keys); a value that is not a hash is
refused. Several hashes per principal let a key be rotated without a gap: add
the new key, move the clients over, revoke the old one.

`save` rewrites the whole file (comments are not kept), atomically and with
mode 0600.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from opscore.errors import ConfigError
from opscore.security import keys
from opscore.security.roles import Role

_NAME = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")
_FIELDS = {"name", "role", "agents", "subject", "key_hashes"}
_MAX_FILE_BYTES = 16 * 1024 * 1024

HEADER = (
    "Ops-Core principals: edit with `opscore auth` (which rewrites this file), then send\n"
    "the server SIGHUP. Keys are stored as hashes only; see docs/security.md."
)


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    role: Role
    agents: tuple[str, ...] | None = None
    subject: str | None = None
    key_hashes: tuple[str, ...] = field(default_factory=tuple)

    def with_key(self, key_hash: str) -> Entry:
        return replace(self, key_hashes=(*self.key_hashes, key_hash))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role.value}
        if self.agents is not None:
            out["agents"] = list(self.agents)
        if self.subject is not None:
            out["subject"] = self.subject
        if self.key_hashes:
            out["key_hashes"] = list(self.key_hashes)
        return out


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError(f"auth file {path} must end in .toml, .yaml or .yml")


def load(path: str | Path) -> list[Entry]:
    """Read and check the file; ConfigError naming the file and the entry on any fault."""
    path = Path(path)
    kind = _kind(path)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read auth file {path}: {exc.strerror}") from exc
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(f"auth file {path} is larger than {_MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text) if kind == "toml" else yaml.safe_load(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"auth file {path} is not valid {kind.upper()}: {exc}") from exc
    return parse(data, str(path))


def load_or_empty(path: str | Path) -> list[Entry]:
    """For `opscore auth`: a file not created yet holds no principals (the server
    refuses a missing file)."""
    return load(path) if Path(path).exists() else []


def parse(data: Any, source: str = "auth file") -> list[Entry]:
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"principals"}:
        raise ConfigError(f"{source}: expected a mapping with one key, 'principals' (a list)")
    items = data.get("principals") or []
    if not isinstance(items, list):
        raise ConfigError(f"{source}: 'principals' must be a list")
    entries = [_entry(item, f"{source}: principal #{i + 1}") for i, item in enumerate(items)]
    _check_unique(entries, source)
    return entries


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {what} must be a list of non-empty strings")
    return tuple(value)


def _entry(item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: name must be 1-128 characters of letters, digits and . _ @ : -"
        )
    where = f"{where} ({name!r})"
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    try:
        role = Role(item.get("role"))
    except ValueError:
        raise ConfigError(
            f"{where}: role must be one of {', '.join(r.value for r in Role)}, "
            f"not {item.get('role')!r}"
        ) from None
    agents: tuple[str, ...] | None = None
    if "agents" in item:
        agents = _strings(item["agents"], where, "agents")
    if role is Role.AGENT and not agents:
        raise ConfigError(
            f"{where}: an agent principal needs 'agents', the agent ids it may act as "
            "(glob patterns such as 'summarizer-*'; '*' for any)"
        )
    if role is not Role.AGENT and agents is not None:
        raise ConfigError(f"{where}: 'agents' applies to role agent only (this is {role})")
    subject = item.get("subject")
    if subject is not None and (not isinstance(subject, str) or not subject.strip()):
        raise ConfigError(f"{where}: subject must be a non-empty string")
    hashes = _strings(item.get("key_hashes", []), where, "key_hashes")
    for h in hashes:
        if not keys.is_key_hash(h):
            raise ConfigError(
                f"{where}: key_hashes holds {h[:8]!r}..., which is not a key hash "
                "(sha256:<64 hex digits>). Store hashes only, never keys: "
                "`opscore auth create-key` prints a key and stores its hash"
            )
    if not hashes and subject is None:
        raise ConfigError(f"{where}: has neither key_hashes nor subject, so no one can use it")
    return Entry(name, role, agents, subject, hashes)


def _check_unique(entries: Iterable[Entry], source: str) -> None:
    names: set[str] = set()
    subjects: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for e in entries:
        if e.name in names:
            raise ConfigError(f"{source}: two principals are named {e.name!r}")
        names.add(e.name)
        if e.subject is not None:
            if e.subject in subjects:
                raise ConfigError(
                    f"{source}: principals {subjects[e.subject]!r} and {e.name!r} have "
                    f"the same subject {e.subject!r}"
                )
            subjects[e.subject] = e.name
        for h in e.key_hashes:
            if h in hashes:
                raise ConfigError(
                    f"{source}: principals {hashes[h]!r} and {e.name!r} share the key "
                    f"{keys.fingerprint(h)}"
                )
            hashes[h] = e.name


# --------------------------------------------------------------------------- writing


def _toml_string(value: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_string(v) for v in value) + "]"
    return _toml_string(value)


def dumps(entries: Iterable[Entry], kind: str) -> str:
    header = "".join(f"# {line}\n" for line in HEADER.splitlines())
    items = [e.to_dict() for e in entries]
    if kind == "yaml":
        return header + yaml.safe_dump({"principals": items}, sort_keys=False)
    out = [header]
    for item in items:
        out.append("\n[[principals]]\n")
        out.extend(f"{k} = {_toml_value(v)}\n" for k, v in item.items())
    return "".join(out)


def save(path: str | Path, entries: list[Entry]) -> None:
    path = Path(path)
    _check_unique(entries, str(path))
    text = dumps(entries, _kind(path))
    # Atomic: a server reading on SIGHUP sees the old file or the new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
