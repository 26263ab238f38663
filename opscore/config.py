"""Server configuration: one frozen object, built from options and an environment mapping.

Every setting has a default, an `OPSCORE_*` environment variable and a command-line
option; the option wins over the variable. Tests build a `Config` directly.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from opscore.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "./opscore.db"


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = DEFAULT_LISTEN
    db: str = DEFAULT_DB
    workflows_dir: str | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    # "full": a commit survives power loss; "normal": survives a process crash only.
    sync: str = "full"
    api_keys: frozenset[str] = field(default_factory=frozenset)
    insecure: bool = False
    agent_timeout: timedelta = timedelta(seconds=30)
    drain_grace: timedelta = timedelta(seconds=10)
    # Server keepalive: the SDK's client settings must stay within these.
    keepalive_time: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=10)
    min_client_ping_interval: timedelta = timedelta(seconds=10)

    def validate(self) -> Config:
        host = listen_host(self.listen)
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log format must be 'json' or 'text', not {self.log_format!r}")
        if self.sync not in ("full", "normal"):
            raise ConfigError(f"sync must be 'full' or 'normal', not {self.sync!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"unknown log level {self.log_level!r}")
        if self.agent_timeout <= timedelta(0):
            raise ConfigError("agent timeout must be positive")
        if not self.api_keys and not self.insecure and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {self.listen} without authentication: set "
                "OPSCORE_API_KEYS or --api-key-file, or pass --insecure to accept "
                "unauthenticated clients from the network"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def listen_host(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen address must be HOST:PORT, got {listen!r}")
    return host.strip("[]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key_file(path: str) -> frozenset[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from exc
    keys = [line.strip() for line in text.splitlines()]
    return frozenset(k for k in keys if k and not k.startswith("#"))


def _seconds(value: str, name: str) -> timedelta:
    try:
        return timedelta(seconds=float(value))
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from exc


def from_sources(options: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from command-line `options` (None = not given) over `env`."""
    env = os.environ if env is None else env

    def pick(opt: str, var: str) -> Any:
        value = options.get(opt)
        return value if value is not None else env.get(var)

    cfg = Config()
    changes: dict[str, Any] = {}
    for opt, var in (
        ("listen", "OPSCORE_LISTEN"),
        ("db", "OPSCORE_DB"),
        ("workflows_dir", "OPSCORE_WORKFLOWS_DIR"),
        ("log_level", "OPSCORE_LOG_LEVEL"),
        ("log_format", "OPSCORE_LOG_FORMAT"),
        ("sync", "OPSCORE_SYNC"),
    ):
        value = pick(opt, var)
        if value not in (None, ""):
            changes[opt] = value
    if "log_level" in changes:
        changes["log_level"] = str(changes["log_level"]).upper()
    timeout = pick("agent_timeout", "OPSCORE_AGENT_TIMEOUT")
    if timeout not in (None, ""):
        changes["agent_timeout"] = _seconds(str(timeout), "agent timeout")
    keys: set[str] = set()
    raw = env.get("OPSCORE_API_KEYS", "")
    keys.update(k.strip() for k in raw.split(",") if k.strip())
    key_file = pick("api_key_file", "OPSCORE_API_KEY_FILE")
    if key_file:
        keys.update(read_api_key_file(str(key_file)))
    changes["api_keys"] = frozenset(keys)
    insecure = pick("insecure", "OPSCORE_INSECURE")
    changes["insecure"] = insecure in (True, "1", "true", "yes")
    return replace(cfg, **changes).validate()
