"""Server configuration: one frozen object, built from options and an environment mapping.

Every setting is declared once, in SETTINGS: its default, its `OPSCORE_*`
environment variable, its command-line option and its help text. `opscore serve`
builds its options from that table, so a new setting is one entry here. The
option wins over the variable. Tests build a `Config` directly.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from opscore import durations, limits
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
    # Principals with roles (opscore.security.authfile); re-read on SIGHUP.
    auth_file: str | None = None
    # TLS: certificate and key (PEM); with a client CA, client certificates are
    # required (mTLS). All are re-read when they change or on SIGHUP.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    insecure: bool = False
    agent_timeout: timedelta = timedelta(seconds=30)
    drain_grace: timedelta = timedelta(seconds=10)
    # Server keepalive: the SDK's client settings must stay within these.
    keepalive_time: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=10)
    min_client_ping_interval: timedelta = timedelta(seconds=10)
    # The largest message the server receives or sends; every response is cut to fit.
    max_message_bytes: int = limits.DEFAULT_MAX_MESSAGE_BYTES
    # HTTP/2 streams one client connection may hold open at once.
    max_streams_per_connection: int = limits.DEFAULT_MAX_STREAMS_PER_CONNECTION
    max_subscriptions_per_agent: int = limits.DEFAULT_MAX_SUBSCRIPTIONS_PER_AGENT
    # New calls gRPC core holds while the server is busy accepting earlier ones
    # (grpc.server.max_pending_requests). Core's default (1,000 soft, 3,000 hard)
    # cancels most of a fleet of agents that reconnect at once.
    max_pending_calls: int = limits.DEFAULT_MAX_PENDING_CALLS
    # 0: no limit. Otherwise writes that would grow the database beyond it fail
    # with RESOURCE_EXHAUSTED and nothing already stored is touched.
    max_db_bytes: int = 0
    # "uvloop" (the default when it is installed) or "asyncio".
    event_loop: str = "auto"
    # Observability (docs/operations.md). None: off, and then it costs nothing.
    # HOST:PORT of the Prometheus scrape endpoint (port 0: any free port).
    metrics_listen: str | None = None
    # OTLP/gRPC collector to export traces to, e.g. http://127.0.0.1:4317.
    otlp_endpoint: str | None = None
    # Finished work and dead agents older than this are pruned (opscore/retention.py);
    # timedelta(0): keep everything.
    retention: timedelta = limits.DEFAULT_RETENTION

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
        if self.agent_timeout > limits.MAX_TASK_TIMEOUT:
            raise ConfigError(f"agent timeout must be at most {limits.MAX_TASK_TIMEOUT.days} days")
        if not 64 * 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max message bytes must be between 65536 and 67108864")
        if self.max_message_bytes < limits.MAX_COMPOSED_INPUT_BYTES + 256 * 1024:
            raise ConfigError(
                f"max message bytes must leave room for a task's input: at least "
                f"{limits.MAX_COMPOSED_INPUT_BYTES + 256 * 1024}"
            )
        if not 1 <= self.max_streams_per_connection <= 1_000_000:
            raise ConfigError("max streams per connection must be between 1 and 1000000")
        if not 100 <= self.max_pending_calls <= 1_000_000:
            raise ConfigError("max pending calls must be between 100 and 1000000")
        if not 1 <= self.max_subscriptions_per_agent <= 1000:
            raise ConfigError("max subscriptions per agent must be between 1 and 1000")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError(
                f"event loop must be auto, uvloop or asyncio, not {self.event_loop!r}"
            )
        if not timedelta(0) <= self.retention <= limits.MAX_RETENTION:
            raise ConfigError(f"retention must be between 0 (off) and {limits.MAX_RETENTION.days}d")
        if self.max_db_bytes < 0:
            raise ConfigError("max db bytes must not be negative (0 for no limit)")
        if self.db.startswith(("postgresql://", "postgres://")):
            # Silently ignoring them would promise a durability or a size limit
            # that PostgreSQL's own settings decide.
            if self.sync != "full":
                raise ConfigError(
                    "--sync applies to SQLite only; on PostgreSQL durability is its "
                    "synchronous_commit setting"
                )
            if self.max_db_bytes:
                raise ConfigError(
                    "--max-db-bytes applies to SQLite only; limit a PostgreSQL database "
                    "with PostgreSQL's own means (disk quotas, monitoring)"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key too")
        if not self.insecure and not is_loopback(host):
            if not self.auth_enabled and not self.tls_client_ca:
                raise ConfigError(
                    f"refusing to listen on {self.listen} without authentication: set "
                    "--auth-file, OPSCORE_API_KEYS or --api-key-file (or --tls-client-ca "
                    "for client certificates), or pass --insecure to accept "
                    "unauthenticated clients from the network"
                )
            if not self.tls_enabled:
                raise ConfigError(
                    f"refusing to listen on {self.listen} without TLS, which would send "
                    "API keys and payloads in clear text: set --tls-cert and --tls-key "
                    "(OPSCORE_TLS_CERT, OPSCORE_TLS_KEY), or pass --insecure to accept "
                    "plaintext connections (e.g. behind a proxy that terminates TLS)"
                )
        if self.metrics_listen is not None:
            try:
                listen_host(self.metrics_listen)
            except ConfigError:
                raise ConfigError(
                    f"metrics listen address must be HOST:PORT, got {self.metrics_listen!r}"
                ) from None
        if self.otlp_endpoint is not None and (
            not self.otlp_endpoint.strip() or any(c.isspace() for c in self.otlp_endpoint)
        ):
            raise ConfigError(
                f"OTLP endpoint must be a URL such as http://127.0.0.1:4317, "
                f"got {self.otlp_endpoint!r}"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.auth_file is not None

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)


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


# --------------------------------------------------------------------------- settings


def _seconds(value: str, name: str) -> timedelta:
    try:
        seconds = float(value)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from exc
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def _int(value: str, name: str) -> int:
    try:
        return int(str(value).replace("_", ""))
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from exc


def _retention(value: str, name: str) -> timedelta:
    """A period in the duration forms of the CLI (opscore/durations.py), days
    included; "off" (or 0) keeps everything, a setting's meaning the parser
    does not know about. The upper bound is Config.validate's."""
    text = str(value).strip().lower()
    if text in ("off", "none", "no", "false"):
        return timedelta(0)
    try:
        period = durations.parse_duration(text)
    except durations.DurationError as exc:
        raise ConfigError(f"{name} must be a duration, or 0/off for none: {exc}") from None
    if period < timedelta(0):
        raise ConfigError(f"{name} must not be negative (0 or off for none), got {value!r}")
    return period


def _flag(value: Any, name: str) -> bool:
    return value in (True, "1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Setting:
    """One server setting: Config attribute, env var, option, how to parse, help."""

    name: str
    env: str
    help: str
    parse: Callable[[str, str], Any] | None = None  # None: keep the string
    flag: bool = False
    choices: tuple[str, ...] = ()
    # Shown in --help, and the type click uses for the option.
    kind: type = str


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "OPSCORE_LISTEN", f"HOST:PORT to listen on.  [default {DEFAULT_LISTEN}]"),
    Setting(
        "db",
        "OPSCORE_DB",
        "SQLite database file, or a postgresql://user@host:5432/dbname URL (any "
        "number of replicas on one database; pool and timeout settings as URL "
        f"parameters, see docs/operations.md).  [default {DEFAULT_DB}]",
    ),
    Setting(
        "workflows_dir",
        "OPSCORE_WORKFLOWS_DIR",
        "Load every *.json, *.yaml, *.yml definition in this directory at start.",
    ),
    Setting(
        "log_level",
        "OPSCORE_LOG_LEVEL",
        "[default INFO]",
        parse=lambda v, _n: v.upper(),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    Setting(
        "log_format",
        "OPSCORE_LOG_FORMAT",
        "One JSON object per line (for log collectors), or text for people (`make run` "
        "uses text).  [default json]",
        choices=("json", "text"),
    ),
    Setting(
        "sync",
        "OPSCORE_SYNC",
        "SQLite only. full: commits survive power loss; normal: they survive a process "
        "crash only (faster).  [default full]",
        choices=("full", "normal"),
    ),
    Setting(
        "agent_timeout",
        "OPSCORE_AGENT_TIMEOUT",
        "Seconds without a sign of life before an agent is marked OFFLINE.  [default 30]",
        parse=_seconds,
        kind=float,
    ),
    Setting(
        "max_message_bytes",
        "OPSCORE_MAX_MESSAGE_BYTES",
        "Largest gRPC message received or sent; larger requests get RESOURCE_EXHAUSTED and "
        f"every response is cut to fit.  [default {limits.DEFAULT_MAX_MESSAGE_BYTES}]",
        parse=_int,
        kind=int,
    ),
    Setting(
        "max_streams_per_connection",
        "OPSCORE_MAX_STREAMS_PER_CONNECTION",
        "Concurrent calls one client connection may hold open.  "
        f"[default {limits.DEFAULT_MAX_STREAMS_PER_CONNECTION}]",
        parse=_int,
        kind=int,
    ),
    Setting(
        "max_subscriptions_per_agent",
        "OPSCORE_MAX_SUBSCRIPTIONS_PER_AGENT",
        "Task streams one agent id may hold open at once.  "
        f"[default {limits.DEFAULT_MAX_SUBSCRIPTIONS_PER_AGENT}]",
        parse=_int,
        kind=int,
    ),
    Setting(
        "max_pending_calls",
        "OPSCORE_MAX_PENDING_CALLS",
        "New calls held while the server accepts earlier ones (e.g. a fleet reconnecting "
        f"at once); beyond it they are cancelled.  [default {limits.DEFAULT_MAX_PENDING_CALLS}]",
        parse=_int,
        kind=int,
    ),
    Setting(
        "max_db_bytes",
        "OPSCORE_MAX_DB_BYTES",
        "SQLite only. Largest the database file may grow; writes beyond it fail with "
        "RESOURCE_EXHAUSTED and stored data is untouched.  [default 0: no limit]",
        parse=_int,
        kind=int,
    ),
    Setting(
        "retention",
        "OPSCORE_RETENTION",
        "Forget finished tasks and sessions, state transitions, and agents OFFLINE or "
        "FINISHED for longer than this (90s, 12h, 7d; 0 or off: keep everything).  "
        f"[default {durations.show(limits.DEFAULT_RETENTION)}]",
        parse=_retention,
    ),
    Setting(
        "event_loop",
        "OPSCORE_EVENT_LOOP",
        "uvloop is faster for gRPC streams; auto uses it when installed.  [default auto]",
        choices=("auto", "uvloop", "asyncio"),
    ),
    Setting(
        "auth_file",
        "OPSCORE_AUTH_FILE",
        "Principals with roles and key hashes (YAML or TOML; see `opscore auth`); "
        "re-read on SIGHUP.",
    ),
    Setting("tls_cert", "OPSCORE_TLS_CERT", "Serve TLS with this certificate chain (PEM)."),
    Setting("tls_key", "OPSCORE_TLS_KEY", "The private key of --tls-cert (PEM)."),
    Setting(
        "tls_client_ca",
        "OPSCORE_TLS_CLIENT_CA",
        "Require client certificates signed by this CA (mTLS). TLS files are re-read "
        "when they change and on SIGHUP.",
    ),
    Setting(
        "metrics_listen",
        "OPSCORE_METRICS_LISTEN",
        "HOST:PORT to serve Prometheus metrics on (HTTP, GET /metrics, no "
        "authentication).  [default: off]",
    ),
    Setting(
        "otlp_endpoint",
        "OPSCORE_OTLP_ENDPOINT",
        "Export OpenTelemetry traces with OTLP/gRPC to this collector, e.g. "
        "http://127.0.0.1:4317.  [default: off, no spans are made]",
    ),
    Setting(
        "insecure",
        "OPSCORE_INSECURE",
        "Allow listening on a non-loopback address without TLS or without authentication.",
        parse=_flag,
        flag=True,
    ),
)


def from_sources(options: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from command-line `options` (None = not given) over `env`."""
    env = os.environ if env is None else env
    changes: dict[str, Any] = {}
    for s in SETTINGS:
        value = options.get(s.name)
        if value is None:
            value = env.get(s.env)
        if value in (None, ""):
            continue
        label = s.name.replace("_", " ")
        if s.parse is not None:
            value = s.parse(value if isinstance(value, bool) else str(value), label)
        changes[s.name] = value
    keys: set[str] = set()
    raw = env.get("OPSCORE_API_KEYS", "")
    keys.update(k.strip() for k in raw.split(",") if k.strip())
    key_file = options.get("api_key_file") or env.get("OPSCORE_API_KEY_FILE")
    if key_file:
        keys.update(read_api_key_file(str(key_file)))
    changes["api_keys"] = frozenset(keys)
    return replace(Config(), **changes).validate()
