"""Plumbing shared by the client commands of the `opscore` CLI: connection options,
running a command on the asyncio client, errors and exit codes, and output (Rich
tables for people, JSON for scripts).

Exit codes: 0 success; 1 the server refused or failed the request, could not be
reached, or (with --wait/--watch) the task or session ended FAILED or
CANCELLED; 2 bad usage (click's own); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opscore.client import DEFAULT_TARGET, OpsCoreClient, TLSConfig
from opscore.client.convert import to_datetime
from opscore.client.errors import OpsCoreError, UnavailableError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

STATE_STYLES = {
    "IDLE": "green",
    "ACTIVE": "cyan",
    "INITIALIZING": "yellow",
    "ERROR": "red",
    "FINISHED": "dim",
    "OFFLINE": "red dim",
    "SCHEDULED": "yellow",
    "QUEUED": "yellow",
    "ASSIGNED": "cyan",
    "COMPLETED": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
    "PENDING": "yellow",
    "RUNNING": "cyan",
    "SERVING": "green",
    "NOT_SERVING": "red",
}


class CommandFailed(Exception):
    """Raised inside a command to end it with a message and exit code 1."""


@dataclass
class Cli:
    """What every client command gets: options, the client and the consoles."""

    target: str
    api_key: str | None
    as_json: bool
    tls: TLSConfig | None = None
    out: Console = field(init=False)
    err: Console = field(init=False)
    _client: OpsCoreClient | None = None

    def __post_init__(self) -> None:
        width = None if sys.stdout.isatty() else _pipe_width()
        self.out = Console(highlight=False, width=width)
        self.err = Console(stderr=True, highlight=False, width=width)

    @property
    def client(self) -> OpsCoreClient:
        assert self._client is not None, "only inside Cli.run"
        return self._client

    def run(self, coro: Coroutine[Any, Any, int | None]) -> NoReturn:
        """Run a command coroutine with a client; exit with its code."""

        async def main() -> int | None:
            async with OpsCoreClient(
                self.target, api_key=self.api_key or "", tls=self.tls or False, env={}
            ) as client:
                self._client = client
                return await coro

        try:
            code = asyncio.run(main())
        except KeyboardInterrupt:
            self.err.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except OpsCoreError as exc:
            self.fail_rpc(exc)
        except CommandFailed as exc:
            self.error(str(exc))
            sys.exit(EXIT_FAILED)
        sys.exit(code or EXIT_OK)

    # ------------------------------------------------------------------ output

    def error(self, message: str, **fields: Any) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": {"message": message, **fields}}), err=True)
        else:
            click.echo(f"Error: {message}", err=True)

    def fail_rpc(self, exc: OpsCoreError) -> NoReturn:
        message = f"{exc.code.name}: {exc.message}"
        if isinstance(exc, UnavailableError):
            message += (
                f"\n  cannot reach an Ops-Core server at {self.target}: is it running? "
                "(set --target or OPSCORE_TARGET)"
            )
        for violation in exc.field_violations:
            message += f"\n  {violation.field}: {violation.description}"
        if exc.request_id and not self.as_json:
            message += f"\n  request id {exc.request_id}"
        self.error(
            message if not self.as_json else exc.message,
            code=exc.code.name,
            reason=exc.reason,
            request_id=exc.request_id,
            field_violations=[
                {"field": v.field, "description": v.description} for v in exc.field_violations
            ],
        )
        sys.exit(EXIT_FAILED)

    def print_json(self, value: Any, *, compact: bool = False) -> None:
        text = json.dumps(value, indent=None if compact else 2, sort_keys=False)
        click.echo(text)

    def print(self, *renderables: Any) -> None:
        self.out.print(*renderables)


def _pipe_width() -> int:
    try:
        return max(80, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return 200


def client_command(
    fn: Callable[..., Coroutine[Any, Any, int | None]],
) -> Callable[..., NoReturn]:
    """Make an `async def command(cli, **options)` a click callback with the
    connection options --target, --api-key, --tls, --ca, --cert, --key and --json."""

    @functools.wraps(fn)
    def callback(*, target: str, api_key: str | None, as_json: bool, **kwargs: Any) -> NoReturn:
        tls = _tls_config(*(kwargs.pop(k) for k in ("tls", "ca", "cert", "key")))
        cli = Cli(target=target, api_key=api_key, as_json=as_json, tls=tls)
        cli.run(fn(cli, **kwargs))

    for name, envvar, help_text in reversed(_TLS_OPTIONS):
        if name == "--tls":
            option = click.option(
                name, is_flag=True, envvar=envvar, show_envvar=True, help=help_text
            )
        else:
            option = click.option(
                name, envvar=envvar, show_envvar=True, metavar="FILE", help=help_text
            )
        callback = option(callback)

    callback = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON for scripts (one JSON object per line when watching).",
    )(callback)
    callback = click.option(
        "--api-key",
        envvar="OPSCORE_API_KEY",
        show_envvar=True,
        help="API key, sent as 'authorization: Bearer <key>'.",
    )(callback)
    callback = click.option(
        "--target",
        envvar="OPSCORE_TARGET",
        show_envvar=True,
        default=DEFAULT_TARGET,
        show_default=True,
        help="Server address HOST:PORT.",
    )(callback)
    return callback


_TLS_OPTIONS = (
    ("--tls", "OPSCORE_TLS", "Connect with TLS (implied by --ca, --cert, --key)."),
    ("--ca", "OPSCORE_TLS_CA", "Trust this CA certificate (PEM) instead of the system roots."),
    ("--cert", "OPSCORE_TLS_CLIENT_CERT", "Client certificate (PEM) for mTLS; with --key."),
    ("--key", "OPSCORE_TLS_CLIENT_KEY", "Private key (PEM) of --cert."),
)


def _tls_config(tls: bool, ca: str | None, cert: str | None, key: str | None) -> TLSConfig | None:
    if not (tls or ca or cert or key):
        return None
    try:
        return TLSConfig.from_files(ca, cert, key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# ---------------------------------------------------------------------- parsing


def parse_payload(value: str | None, what: str = "--input") -> dict[str, Any] | None:
    """A JSON object given inline, or as @FILE (JSON or YAML; @- for stdin)."""
    if value is None:
        return None
    if value.startswith("@"):
        path = value[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {path}: {exc.strerror}", param_hint=what
            ) from None
        try:
            data = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"{path} is not valid: {exc}", param_hint=what) from None
    else:
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(
                f"not valid JSON ({exc}); pass a JSON object or @FILE", param_hint=what
            ) from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object ({...})", param_hint=what)
    return data


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | None, what: str) -> timedelta | None:
    """ "90", "90s", "1.5m", "250ms", "2h" as a timedelta."""
    if value is None:
        return None
    text = value.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = text, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise click.BadParameter(
            f"{value!r} is not a duration (e.g. 30, 30s, 250ms, 5m, 1h)", param_hint=what
        )
    return timedelta(seconds=seconds)


def limit_option(default: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --limit option of list commands."""
    return click.option(
        "--limit", type=int, default=default, show_default=True, help="At most this many (0: all)."
    )


def state_choice(enum: Any, prefix: str) -> click.Choice[str]:
    names = [n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")]
    return click.Choice(names, case_sensitive=False)


# ---------------------------------------------------------------------- formatting


def short_name(enum: Any, value: int, prefix: str) -> str:
    """`AGENT_STATE_IDLE` -> "IDLE"."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def styled(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def age(message: Message, field_name: str, now: datetime | None = None) -> str:
    """ "12s ago", "3m ago"... or "-" when unset."""
    when = to_datetime(message, field_name)
    if when is None:
        return "-"
    return _relative(when, now)


def _relative(when: datetime, now: datetime | None = None) -> str:
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    suffix = "ago" if seconds >= 0 else "from now"
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} {suffix}"
    return f"{int(seconds)}s {suffix}"


def timestamp(message: Message, field_name: str) -> str:
    """ISO 8601 UTC with the age, or "-"."""
    when = to_datetime(message, field_name)
    if when is None:
        return "-"
    return f"{when.strftime('%Y-%m-%d %H:%M:%S')}Z ({_relative(when)})"


def compact_json(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message_json(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, every field present,
    enums by name, integral numbers as ints."""
    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _integral(data)  # type: ignore[no-any-return]


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


def details_table(rows: Iterable[tuple[str, Any]]) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    for name, value in rows:
        t.add_row(name, value if isinstance(value, Text) else str(value))
    return t


def pretty(value: Mapping[str, Any] | None) -> str:
    """A dict as indented JSON for detail views ("-" when empty)."""
    if not value:
        return "-"
    return json.dumps(value, indent=2)
