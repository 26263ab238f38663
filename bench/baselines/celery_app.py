"""Celery 5 baseline: a no-op task, Redis broker and Redis result backend,
`acks_late=True` and a prefetch of one task per worker process (the counterpart
of Ops-Core's max_in_flight=1).

The worker is started by bench/scenarios/baselines.py as
    python -m celery -A bench.baselines.celery_app worker -P prefork -c K ...
with BENCH_CELERY_BROKER / BENCH_CELERY_BACKEND / BENCH_CELERY_READY in its
environment; the producer (bench/loadgen.py role `celery`) calls make_app().
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("bench", broker=broker, backend=backend)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=False,
        result_expires=3600,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop", acks_late=True)
    def noop(payload: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    return app


app = make_app(
    os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/1"),
)


@worker_ready.connect
def _ready(**_: Any) -> None:
    flag = os.environ.get("BENCH_CELERY_READY")
    if flag:
        Path(flag).touch()
