"""What one per-RPC log line costs the server, in-process: the line the
interceptor writes at INFO for every unary call, through the server's own
handler and formatter into a file, and the formatting alone. The minimum of
several repeats, so it resolves a microsecond where an end-to-end run cannot.

    python -m bench.tools.log_cost
"""

from __future__ import annotations

import logging
import sys
import tempfile
import timeit
from collections.abc import Callable

from opscore import logs

FIELDS = {
    "method": "/opscore.v1.DispatchService/CompleteTask",
    "code": "OK",
    "duration_ms": 0.512,
    "peer": "ipv4:127.0.0.1:51234",
    "agent_id": "agent-00012",
    "principal": None,
    "request_id": "0b8f2c6d9e1a4b7c",
}


def main() -> None:
    with tempfile.TemporaryFile("w") as sink:
        saved = sys.stderr
        sys.stderr = sink  # setup() binds its handler to the stderr of the moment
        try:
            logs.setup("INFO", "json")
        finally:
            sys.stderr = saved
        log = logging.getLogger("opscore.rpc")
        handler = logging.getLogger().handlers[0]
        record = log.makeRecord(log.name, logging.INFO, "", 0, "rpc", (), None, extra=FIELDS)
        cases: list[tuple[str, Callable[[], object]]] = [
            (
                "log.info() of an RPC line, JSON, written to a file",
                lambda: log.info("rpc", extra=FIELDS),
            ),
            ("the JSON formatting alone", lambda: handler.format(record)),
        ]
        n = 20_000
        for name, fn in cases:
            best = min(timeit.repeat(fn, number=n, repeat=9))
            print(f"{name}: {best / n * 1e6:.2f} us per line")
        logging.getLogger().handlers[:] = []


if __name__ == "__main__":
    main()
