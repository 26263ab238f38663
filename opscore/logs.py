"""Structured logging: one JSON object per line (or plain text for people).

At the default INFO level the server writes a line per unary RPC, so the
formatters are on the hot path of every call: they format the time from a
per-second cache and encode with one prebuilt JSON encoder (`json.dumps` with
`default=` builds a new encoder per call). `python -m bench.tools.log_cost`
measures a line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and is
# emitted as a field of the JSON line.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}

# Values the encoder cannot represent (datetimes, enums, exceptions) are written
# as their str(); a log line must never fail because of a field.
_encode = json.JSONEncoder(default=str).encode


class _SecondCache:
    """The formatted part of a timestamp down to the second, for the last second
    seen: lines come many per second, and formatting a datetime costs more than
    the rest of the time field. Not locked: logging formats a record under its
    handler's lock, and each formatter belongs to one handler."""

    __slots__ = ("pattern", "second", "text")

    def __init__(self, pattern: str) -> None:
        self.second = -1
        self.text = ""
        self.pattern = pattern

    def get(self, second: int) -> str:
        if second != self.second:
            self.text = datetime.fromtimestamp(second, UTC).strftime(self.pattern)
            self.second = second
        return self.text


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # ISO 8601 in UTC to the millisecond, as datetime.isoformat() writes it.
        stamp = f"{self._seconds.get(int(record.created))}.{int(record.msecs):03d}+00:00"
        out = {
            "time": stamp,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return _encode(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache("%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        base = f"{self._seconds.get(int(record.created))}.{int(record.msecs):03d}"
        line = f"{base} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "INFO", fmt: str = "json") -> None:
    # Neither format prints the caller, thread or process, and at INFO the server
    # logs a line per unary RPC: skip what every record would otherwise look up
    # (a stack walk, the current thread, a getpid() call). The logging HOWTO's
    # "Optimization" section names these switches.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite logs every call at DEBUG; grpc is noisy at INFO on shutdown.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
