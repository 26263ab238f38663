"""Plumbing shared by the client commands of the `opscore` CLI: connection options,
running a command on the asyncio client, errors and exit codes, and output (Rich
tables for people, JSON for scripts).

The connection options (--target, --api-key, --json) are accepted both before
the command (`opscore --json tasks list`, options of the group) and after it
(`opscore tasks list --json`); the one after wins, then the environment
(OPSCORE_TARGET, OPSCORE_API_KEY), then the default.

Exit codes: 0 success; 1 the server refused or failed the request, could not be
reached, or (with --wait/--watch) the task or session ended FAILED or
CANCELLED; 2 bad usage (click's own); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opscore import durations
from opscore.client import DEFAULT_TARGET, OpsCoreClient, TLSConfig
from opscore.client.convert import json_like_problem, to_datetime
from opscore.client.errors import OpsCoreError, connection_problem

T = TypeVar("T")

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


TARGET_ENV = "OPSCORE_TARGET"
API_KEY_ENV = "OPSCORE_API_KEY"
TARGET_SETTING = f"--target or {TARGET_ENV}"
API_KEY_SETTING = f"--api-key or {API_KEY_ENV}"
GLOBAL_HELP = (
    f"Every client command takes --target HOST:PORT (env {TARGET_ENV}, default "
    f"{DEFAULT_TARGET}), --api-key KEY (env {API_KEY_ENV}) and --json (JSON for "
    "scripts, errors included), before or after the command name. They exit 1 "
    "when the request fails, 2 on bad usage."
)


class CommandFailed(Exception):
    """Raised inside a command to end it with a message and exit code 1."""


@dataclass(frozen=True)
class Globals:
    """The connection options given before the command name (None: not given)."""

    target: str | None = None
    api_key: str | None = None
    as_json: bool = False
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Globals:
        return cls(
            options.get("target"),
            options.get("api_key"),
            bool(options.get("as_json")),
            bool(options.get("tls")),
            options.get("ca"),
            options.get("cert"),
            options.get("key"),
        )


def wants_json(argv: Iterable[str]) -> bool:
    """Whether --json is among the options (before a `--`), so that even a usage
    error found before any command runs can be reported as JSON."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def global_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--json, --target, --api-key and the TLS options, for the group and for every
    client command."""
    for name, envvar, help_text in reversed(_TLS_OPTIONS):
        if name == "--tls":
            fn = click.option(
                name, is_flag=True, default=None, help=f"{help_text}  [env {envvar}]"
            )(fn)
        else:
            fn = click.option(name, metavar="FILE", help=f"{help_text}  [env {envvar}]")(fn)
    fn = click.option(
        "--json",
        "as_json",
        is_flag=True,
        default=None,
        help="Print JSON for scripts (one object per line when watching); errors too.",
    )(fn)
    fn = click.option(
        "--api-key",
        metavar="KEY",
        help=f"API key, sent as 'authorization: Bearer KEY'.  [env {API_KEY_ENV}]",
    )(fn)
    fn = click.option(
        "--target",
        metavar="HOST:PORT",
        help=f"Server address.  [env {TARGET_ENV}; default {DEFAULT_TARGET}]",
    )(fn)
    return fn


_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


def check_target(target: str) -> str:
    """HOST:PORT; a URL gets a hint instead of a connection error."""
    lowered = target.strip().lower()
    for scheme in _URL_SCHEMES:
        if lowered.startswith(scheme):
            bare = target.strip()[len(scheme) :].rstrip("/")
            raise click.BadParameter(
                f"{target!r} is a URL; give HOST:PORT without a scheme, e.g. "
                f"--target {bare or DEFAULT_TARGET}",
                param_hint="--target",
            )
    return target


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
        problem = connection_problem(
            exc, self.target, target_setting=TARGET_SETTING, api_key_setting=API_KEY_SETTING
        )
        if problem is not None:
            # One line: what is wrong and which setting fixes it.
            self.error(
                f"{exc.code.name}: {problem}" if not self.as_json else problem,
                code=exc.code.name,
                reason=exc.reason,
                request_id=exc.request_id,
                field_violations=[],
            )
            sys.exit(EXIT_FAILED)
        message = f"{exc.code.name}: {exc.message}"
        for violation in exc.field_violations:
            # The server's message usually says it already (every problem of a
            # refused definition is in it): each problem is shown once.
            if violation.description not in exc.message:
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

    def warn(self, message: str) -> None:
        """A note on stderr that does not fail the command."""
        if self.as_json:
            click.echo(json.dumps({"warning": {"message": message}}), err=True)
        else:
            self.err.print(Text(f"note: {message}", style="yellow"))

    def more_results(self, shown: int, what: str) -> None:
        """Say that --limit cut the list short."""
        self.warn(f"showing the first {shown} {what}; more exist (--limit 0 shows all)")

    def print_json(self, value: Any, *, compact: bool = False) -> None:
        text = json.dumps(value, indent=None if compact else 2, sort_keys=False)
        click.echo(text)

    def print(self, *renderables: Any) -> None:
        for r in renderables:
            if isinstance(r, Table) and r.show_header:
                fit(r, self.out.width)
        self.out.print(*renderables)


class _WatchNotes(logging.Handler):
    """Shows the client's reconnect messages of a watch as notes on stderr."""

    def __init__(self, cli: Cli) -> None:
        super().__init__(logging.INFO)
        self.cli = cli

    def emit(self, record: logging.LogRecord) -> None:
        if "watch broken" in record.getMessage():
            self.cli.warn(record.getMessage())


@contextlib.contextmanager
def watch_notes(cli: Cli, logger: logging.Logger) -> Iterator[None]:
    """While watching: tell the user when the stream broke and is being resumed."""
    handler = _WatchNotes(cli)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _pipe_width() -> int:
    try:
        return max(80, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return 200


def client_command(
    fn: Callable[..., Coroutine[Any, Any, int | None]],
) -> Callable[..., NoReturn]:
    """Make an `async def command(cli, **options)` a click callback with the
    connection options --target, --api-key, --json and the TLS ones (also taken
    before the command name, see `Globals`)."""

    @functools.wraps(fn)
    def callback(
        *,
        target: str | None,
        api_key: str | None,
        as_json: bool | None,
        tls: bool | None,
        ca: str | None,
        cert: str | None,
        key: str | None,
        **kwargs: Any,
    ) -> NoReturn:
        ctx = click.get_current_context()
        given = ctx.find_object(Globals) or Globals()
        resolved_target = target or given.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        api = next(
            (k for k in (api_key, given.api_key, os.environ.get(API_KEY_ENV)) if k is not None),
            None,
        )
        cli = Cli(
            target=check_target(resolved_target),
            api_key=api,
            as_json=bool(as_json) or given.as_json,
            tls=_tls_config(
                bool(tls) or given.tls or os.environ.get("OPSCORE_TLS", "") in ("1", "true"),
                *(
                    mine or theirs or os.environ.get(env) or None
                    for mine, theirs, env in (
                        (ca, given.ca, "OPSCORE_TLS_CA"),
                        (cert, given.cert, "OPSCORE_TLS_CLIENT_CERT"),
                        (key, given.key, "OPSCORE_TLS_CLIENT_KEY"),
                    )
                ),
            ),
        )
        cli.run(fn(cli, **kwargs))

    return global_options(callback)


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
            data = json.loads(value, parse_constant=_not_json)
        except ValueError as exc:
            raise click.BadParameter(
                f"not valid JSON ({exc}); pass a JSON object or @FILE", param_hint=what
            ) from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object ({...})", param_hint=what)
    problem = json_like_problem(data, what.lstrip("-"))
    if problem is not None:
        raise click.BadParameter(problem, param_hint=what)
    return data


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every other client) does not.
    raise ValueError(f"{name} is not a JSON number")


def parse_duration(value: str | None, what: str) -> timedelta | None:
    """An option's duration ("90", "90s", "1.5m", "250ms", "2h"), parsed as the
    server parses them in workflow definitions (opscore.durations)."""
    if value is None:
        return None
    try:
        parsed = durations.parse_duration(value)
    except durations.DurationError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None
    if parsed < timedelta(0):
        raise click.BadParameter(
            f"{value!r} is negative; a duration here is 0 or more", param_hint=what
        )
    return parsed


def limit_option(default: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --limit option of list commands: 0 for all, never negative."""
    return click.option(
        "--limit",
        type=click.IntRange(min=0),
        default=default,
        show_default=True,
        help="At most this many (0: all); says so when more exist.",
    )


async def take(items: AsyncIterator[T], limit: int) -> tuple[list[T], bool]:
    """At most `limit` items (0: all), and whether more exist: one more is read
    to find out."""
    found: list[T] = []
    async for item in items:
        if limit and len(found) == limit:
            return found, True
        found.append(item)
    return found, False


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
    """A message as JSON-ready data: proto field names, every field present
    (unset message fields as null), enums by name, 64-bit integers and
    integral numbers as JSON numbers (not strings)."""
    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    _complete(message, data)
    return _integral(data)  # type: ignore[no-any-return]


# Messages MessageToDict renders as JSON values of their own: not walked into.
_JSON_VALUED = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.Any",
    "google.protobuf.FieldMask",
}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _complete(message: Message, data: dict[str, Any]) -> None:
    for fd in message.DESCRIPTOR.fields:
        name = fd.name
        sub = fd.message_type
        if sub is not None and sub.GetOptions().map_entry:
            continue
        if sub is not None:
            walk = sub.full_name not in _JSON_VALUED
            if fd.is_repeated:
                if walk:
                    for item, out in zip(getattr(message, name), data.get(name, []), strict=False):
                        _complete(item, out)
            elif not message.HasField(name):
                data[name] = None
            elif walk:
                _complete(getattr(message, name), data[name])
        elif fd.type in _INT64 and name in data:
            value = data[name]
            data[name] = [int(v) for v in value] if fd.is_repeated else int(value)


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


#: Columns of free text: the ones shortened (with an ellipsis) when a table is
#: wider than the terminal, so that ids, states and numbers stay whole.
FLEX_COLUMNS = frozenset(
    {"NAME", "FOR", "CAPABILITIES", "NOTE", "RESULT", "DETAILS", "WORKFLOW", "PARAMETERS"}
)
_MIN_FLEX = 6
_COLUMN_GAP = 2


def table(*columns: str, title: str | None = None) -> Table:
    """A table that keeps one line per row (see `fit`)."""
    t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for column in columns:
        t.add_column(column, no_wrap=True, overflow="ellipsis")
    return t


def fit(t: Table, width: int) -> None:
    """Shorten the free-text columns of `t` (FLEX_COLUMNS) so that its rows fit
    `width` characters; the other columns keep their full width."""
    need = [
        max([cell_len(str(column.header)), *(cell_len(_plain(c)) for c in column._cells)])
        for column in t.columns
    ]
    total = sum(need) + _COLUMN_GAP * (len(need) - 1)
    flex = [i for i, column in enumerate(t.columns) if str(column.header) in FLEX_COLUMNS]
    if total <= width or not flex:
        return
    room = width - (total - sum(need[i] for i in flex))
    # Largest first: each flexible column gets an equal share of what is left,
    # or less if it needs less.
    for n, i in enumerate(sorted(flex, key=lambda i: need[i])):
        share = max(_MIN_FLEX, room // (len(flex) - n))
        t.columns[i].max_width = min(need[i], share)
        room -= t.columns[i].max_width


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


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
