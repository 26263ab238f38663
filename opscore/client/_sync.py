"""The blocking client: the asyncio client driven from a private event loop thread.

Each `OpsCoreClientSync` owns one daemon thread running an event loop, with one
`OpsCoreClient` on it; every method submits the async method's coroutine to that
loop and waits for its result. So both clients share one implementation (the
same retries, errors and conversions) and the sync one can be used from any
thread, including from several at once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from opscore.client._client import OpsCoreClient, RetryConfig
from opscore.client.convert import Seconds
from opscore.client.tls import TLSConfig

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[OpsCoreClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[OpsCoreClientSync, P], R]:
    def call(self: OpsCoreClientSync, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def _blocking_iter(
    method: Callable[Concatenate[OpsCoreClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[OpsCoreClientSync, P], Iterator[T]]:
    def call(self: OpsCoreClientSync, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._client, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


class OpsCoreClientSync:
    """Blocking client for an Ops-Core server, for scripts and threads.

        with OpsCoreClientSync("127.0.0.1:50051") as client:
            for agent in client.iter_agents(state="idle"):
                print(agent.agent_id)

    The arguments, methods, return values and errors are those of
    `OpsCoreClient` (see its documentation), without `await`; the `iter_*` and
    `watch_*` methods return ordinary iterators. Call `close()` (or use `with`)
    to stop the client's background thread.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        tls: bool | TLSConfig | None = None,
        root_certificates: bytes | None = None,
        timeout: Seconds | None = 30.0,
        retry: RetryConfig | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._client = OpsCoreClient(
            target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            timeout=timeout,
            retry=retry,
            channel_options=channel_options,
            env=env,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="opscore-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def target(self) -> str:
        """The target in use (one of `targets`)."""
        return self._client.target

    @property
    def targets(self) -> tuple[str, ...]:
        return self._client.targets

    @property
    def retry(self) -> RetryConfig:
        """The retry configuration of the underlying client."""
        return self._client.retry

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("OpsCoreClientSync cannot be called from its own loop thread")
        future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C) or failed: make sure the call does not go on alone.
            future.cancel()
            raise

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await agen.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._closed:
                self._run(aclose())

    def close(self) -> None:
        """Close the channel and stop the background thread. Idempotent."""
        if self._closed:
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> OpsCoreClientSync:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    check_health = _blocking(OpsCoreClient.check_health)

    register_agent = _blocking(OpsCoreClient.register_agent)
    register_agent_response = _blocking(OpsCoreClient.register_agent_response)
    deregister_agent = _blocking(OpsCoreClient.deregister_agent)
    get_agent = _blocking(OpsCoreClient.get_agent)
    list_agents = _blocking(OpsCoreClient.list_agents)
    iter_agents = _blocking_iter(OpsCoreClient.iter_agents)
    report_state = _blocking(OpsCoreClient.report_state)
    heartbeat = _blocking(OpsCoreClient.heartbeat)
    list_state_transitions = _blocking(OpsCoreClient.list_state_transitions)
    iter_state_transitions = _blocking_iter(OpsCoreClient.iter_state_transitions)
    watch_agents = _blocking_iter(OpsCoreClient.watch_agents)

    enqueue_task = _blocking(OpsCoreClient.enqueue_task)
    enqueue_task_response = _blocking(OpsCoreClient.enqueue_task_response)
    enqueue_tasks = _blocking(OpsCoreClient.enqueue_tasks)
    enqueue_tasks_response = _blocking(OpsCoreClient.enqueue_tasks_response)
    subscribe_tasks = _blocking_iter(OpsCoreClient.subscribe_tasks)
    complete_task = _blocking(OpsCoreClient.complete_task)
    fail_task = _blocking(OpsCoreClient.fail_task)
    heartbeat_task = _blocking(OpsCoreClient.heartbeat_task)
    get_task = _blocking(OpsCoreClient.get_task)
    list_tasks = _blocking(OpsCoreClient.list_tasks)
    iter_tasks = _blocking_iter(OpsCoreClient.iter_tasks)
    list_task_attempts = _blocking(OpsCoreClient.list_task_attempts)
    iter_task_attempts = _blocking_iter(OpsCoreClient.iter_task_attempts)
    cancel_task = _blocking(OpsCoreClient.cancel_task)

    create_workflow_definition = _blocking(OpsCoreClient.create_workflow_definition)
    create_workflow_definition_response = _blocking(
        OpsCoreClient.create_workflow_definition_response
    )
    get_workflow_definition = _blocking(OpsCoreClient.get_workflow_definition)
    list_workflow_definitions = _blocking(OpsCoreClient.list_workflow_definitions)
    iter_workflow_definitions = _blocking_iter(OpsCoreClient.iter_workflow_definitions)
    delete_workflow_definition = _blocking(OpsCoreClient.delete_workflow_definition)
    start_workflow = _blocking(OpsCoreClient.start_workflow)
    start_workflow_response = _blocking(OpsCoreClient.start_workflow_response)
    get_session = _blocking(OpsCoreClient.get_session)
    list_sessions = _blocking(OpsCoreClient.list_sessions)
    iter_sessions = _blocking_iter(OpsCoreClient.iter_sessions)
    cancel_session = _blocking(OpsCoreClient.cancel_session)
    watch_session = _blocking_iter(OpsCoreClient.watch_session)
