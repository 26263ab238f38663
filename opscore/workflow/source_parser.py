"""Big workflow sources are parsed in a worker process.

libyaml composes a whole document in C without giving up the GIL, so a large
YAML source parsed on a thread still stalls the event loop for a hundred
milliseconds and more. A separate process shares no GIL, and a parser that
crashes or runs away on hostile text takes only the worker down: the server
kills it, answers INVALID_ARGUMENT and starts a fresh one for the next source.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from opscore.errors import FieldViolation, InvalidArgument
from opscore.workflow.definitions import Definition, parse_source

log = logging.getLogger("opscore.workflow")

# A source within the limits parses in about a second; far beyond that, the
# text is hostile or the machine is starved: either way the answer is no.
PARSE_TIMEOUT = 30.0


def _parse(source: str, origin: str) -> tuple[str, bytes | str, list[tuple[str, str]]]:
    """In the worker: the definition's bytes, or the refusal (plain data: pickles)."""
    try:
        return "ok", parse_source(source, origin=origin).SerializeToString(), []
    except InvalidArgument as exc:
        return "invalid", exc.message, [(v.field, v.description) for v in exc.violations]


class SourceParser:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, never fork: the server process runs gRPC threads.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    async def parse(self, source: str, origin: str) -> Definition:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor(), _parse, source, origin)
        try:
            kind, body, violations = await asyncio.wait_for(future, PARSE_TIMEOUT)
        except TimeoutError:
            self._discard("timed out")
            raise InvalidArgument(
                f"{origin} took more than {PARSE_TIMEOUT:.0f} s to parse; it is refused",
                field="source",
            ) from None
        except BrokenProcessPool:
            self._discard("crashed")
            raise InvalidArgument(
                f"{origin} could not be parsed (the parser failed on it)", field="source"
            ) from None
        if kind == "ok":
            return Definition.FromString(body)  # type: ignore[arg-type]
        raise InvalidArgument(str(body), violations=[FieldViolation(f, d) for f, d in violations])

    def _discard(self, why: str) -> None:
        log.warning("definition parser worker %s; starting a new one", why)
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
