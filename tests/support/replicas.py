"""Several Ops-Core server processes on one PostgreSQL database.

    with start_replicas(tmp_path, url, 3, "--agent-timeout", "2") as servers:
        ...                        # servers[i].target, servers[i].kill(), ...

They start at once (each applies the migrations it finds missing, concurrently,
as replicas of a real deployment would) and are stopped on exit if the test has
not stopped them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.procserver import ServerProcess, running_server


@contextlib.contextmanager
def start_replicas(tmp_path: Path, url: str, n: int, *args: str) -> Iterator[list[ServerProcess]]:
    managers: list[contextlib.AbstractContextManager[ServerProcess]] = [
        running_server(tmp_path, *args, db_path=url) for _ in range(n)
    ]
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        servers: list[ServerProcess] = []
        errors: list[BaseException] = []
        for manager, future in zip(managers, futures, strict=True):
            try:
                servers.append(future.result())
            except BaseException as exc:  # reported once every start has ended
                errors.append(exc)
                continue
            stack.push(_exit_of(manager))
        if errors:
            raise errors[0]
        yield servers


def _exit_of(manager: contextlib.AbstractContextManager[Any]) -> Any:
    def exit_(*exc_info: Any) -> bool | None:
        return manager.__exit__(*exc_info)

    return exit_
