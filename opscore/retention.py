"""Retention: forget what is older than `--retention` (default 7 days), a small
batch at a time, so the database stops growing without dispatch noticing.

What goes (each rule in opscore.storage.api.PruneKind): finished tasks with
their attempts, finished sessions with their runs, events and definition
snapshot, state transitions (each agent's latest stays), and agents OFFLINE,
FINISHED or deregistered for longer than the period, with their transitions.
Nothing an open task or a running session still refers to goes, and an
idempotency key is remembered as long as its task or session: at least the
period after it finished.

How: a pass every `interval` (a tenth of the period, between
RETENTION_MIN_INTERVAL and RETENTION_MAX_INTERVAL) with one cutoff, now minus
the period. It prunes each kind in turn, one batch (about RETENTION_BATCH_ROWS
rows, one transaction, `Storage.prune`) after another until nothing expired is
left, and pauses between batches RETENTION_PAUSE_FACTOR times as long as the
last one took (at least RETENTION_MIN_PAUSE): pruning gets at most a tenth of
the time, and the operations queued meanwhile go first. After a pass that removed rows, the space
is given back the same way (`Storage.reclaim`: SQLite's incremental vacuum).
A pass that removed something logs one line with the rows per table, which the
metric `opscore_retention_pruned_rows_total{kind}` counts too.

Every replica on a PostgreSQL database runs its own loop; their batches lock
what they remove with SKIP LOCKED, so they share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from opscore import durations, limits
from opscore.clock import utcnow
from opscore.errors import OpsCoreError
from opscore.observability.observer import NO_OBSERVER, EngineObserver
from opscore.storage.api import PRUNE_KINDS, Storage

log = logging.getLogger("opscore.retention")

# How long stop() lets the batch in progress finish before cancelling it.
_STOP_TIMEOUT = 5.0


def interval_for(period: timedelta) -> timedelta:
    return min(limits.RETENTION_MAX_INTERVAL, max(limits.RETENTION_MIN_INTERVAL, period / 10))


class Retention:
    def __init__(
        self,
        storage: Storage,
        period: timedelta,
        *,
        observer: EngineObserver = NO_OBSERVER,
        batch_rows: int = limits.RETENTION_BATCH_ROWS,
        interval: timedelta | None = None,
    ) -> None:
        self.storage = storage
        self.period = period
        self.observer = observer
        self.batch_rows = batch_rows
        self.interval = interval or interval_for(period)
        self.passes = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.period > timedelta(0)

    def describe(self) -> str:
        """For the server's start line: "7d", or "off"."""
        return durations.show(self.period) if self.enabled else "off"

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="opscore-retention"
            )

    async def stop(self) -> None:
        """Let the batch in progress finish (bounded), then end the loop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), _STOP_TIMEOUT)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while not self._stopping:
            # Wait first: a server starting does not prune before it serves.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval.total_seconds())
            if self._stopping:
                return
            if self.storage.refusing is not None:
                continue  # rebuilding after a storage error: next pass
            try:
                await self.run_once()
            except OpsCoreError as exc:
                log.info("retention pass interrupted: %s", exc.message)
            except Exception:
                log.exception("retention pass failed; trying again at the next one")

    async def run_once(self, before: datetime | None = None) -> dict[str, int]:
        """One pass: everything that expired before `before` (default: now minus
        the period), batch by batch; the rows removed per table."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        before = before or utcnow() - self.period
        totals: dict[str, int] = {}
        batches = 0
        for kind in PRUNE_KINDS:
            while not self._stopping:
                t0 = loop.time()
                pruned = await self.storage.prune(kind, before, self.batch_rows)
                batches += 1
                for table, n in pruned.rows.items():
                    totals[table] = totals.get(table, 0) + n
                    self.observer.rows_pruned(table, n)
                if not pruned.more or not pruned.total:
                    break
                await self._pause(loop.time() - t0)
        freed = 0
        if totals:
            while not self._stopping:
                t0 = loop.time()
                pages = await self.storage.reclaim()
                if not pages:
                    break
                freed += pages
                await self._pause(loop.time() - t0)
        self.passes += 1
        if totals:
            log.info(
                "retention: pruned what expired before %s",
                before.isoformat(timespec="seconds"),
                extra={
                    "pruned": totals,
                    "batches": batches,
                    "pages_freed": freed,
                    "seconds": round(loop.time() - started, 3),
                    "retention": self.describe(),
                },
            )
        return totals

    async def _pause(self, took: float) -> None:
        pause = max(
            limits.RETENTION_MIN_PAUSE.total_seconds(), took * limits.RETENTION_PAUSE_FACTOR
        )
        await asyncio.sleep(pause)
