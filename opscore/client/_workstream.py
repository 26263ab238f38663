"""The work stream (DispatchService.Connect) in the SDK: one call, and what an
agent says on it, kept until answered across reconnects.

`WorkStream` is one Connect call, made by `OpsCoreClient.connect()`: `open()`
sends the hello and returns the server's `ConnectAccepted`, `read()` returns the
ServerMessages of the next ConnectResponse, `send()` writes AgentMessages as one
ConnectRequest, `done_writing()` half-closes. Failures raise the `OpsCoreError`
hierarchy, as every other call does.

`Outbox` holds the AgentMessages of an agent across its streams. `submit()`
gives a message its id and returns a future for its AgentMessageResult; the
stream's writer `take()`s everything ready at once, so results that are ready
together go out in one ConnectRequest and a lone one is never held back. What
was not answered when a stream ended is sent again, in order, on the next one
(`rewind()`): the server answers a repeated result, heartbeat or report as it
did the first time, so a resend is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from opscore_proto.v1 import dispatch_pb2

from opscore.client.errors import (
    FieldViolation,
    OpsCoreError,
    UnavailableError,
    error_class,
    error_from_rpc,
)
from opscore.limits import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["Outbox", "WorkStream", "error_from_result", "on_refusal"]

_METHOD = "Connect"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# What one ConnectRequest may carry: half the server's default limit, so a batch
# fits a server configured lower, and the largest valid item (a 1 MiB output)
# always fits alone.
BATCH_BYTES = DEFAULT_MAX_MESSAGE_BYTES // 2


# The answer to one item: its result, or None when no stream will carry it.
_Answer = asyncio.Future[dispatch_pb2.AgentMessageResult | None]


def error_from_result(result: dispatch_pb2.AgentMessageResult) -> OpsCoreError | None:
    """The error a refused item stands for, as the unary call would have raised
    it (`FailedPreconditionError` with reason "LEASE_LOST", ...); None when the
    item was accepted."""
    if result.code == 0:
        return None
    code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
    violations = (FieldViolation(result.field, result.message),) if result.field else ()
    return error_class(code)(
        result.message or code.name.replace("_", " ").lower(),
        code=code,
        reason=result.reason,
        method=_METHOD,
        field_violations=violations,
    )


class WorkStream:
    """One Connect call of one agent. Read it continuously: the server stops
    reading an agent that does not read what it is sent."""

    def __init__(
        self,
        call: Any,
        request_id: str,
        hello: dispatch_pb2.ConnectHello,
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        self._call = call
        self.request_id = request_id
        self.hello = hello
        # Told when the stream fails with UNAVAILABLE: the client moves on to the
        # next target, where the agent's next stream goes.
        self._on_unavailable = on_unavailable
        #: The server's answer to the hello, once `open()` returned.
        self.accepted: dispatch_pb2.ConnectAccepted | None = None
        # ServerMessages that came with `accepted` (none today), for read().
        self._early: list[dispatch_pb2.ServerMessage] = []

    def _error(self, err: grpc.aio.AioRpcError) -> OpsCoreError:
        error = error_from_rpc(err, request_id=self.request_id, method=_METHOD)
        if isinstance(error, UnavailableError) and self._on_unavailable is not None:
            self._on_unavailable()
        return error

    async def open(self) -> dispatch_pb2.ConnectAccepted:
        """Say hello and wait for `accepted`. Raises what a bad hello gets
        (NotFoundError, InvalidArgumentError, FailedPreconditionError, ...)."""
        await self._write(dispatch_pb2.ConnectRequest(hello=self.hello))
        try:
            first = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from err
        if first is grpc.aio.EOF or not first.HasField("accepted"):
            raise UnavailableError(
                "the work stream ended before the server accepted it",
                request_id=self.request_id,
                method=_METHOD,
            )
        self.accepted = first.accepted
        self._early = list(first.messages)
        return first.accepted

    async def read(self) -> list[dispatch_pb2.ServerMessage] | None:
        """The ServerMessages of the next response, to apply in order; None once
        the server ended the stream with OK (after a half-close, or the agent
        was deregistered)."""
        if self._early:
            early, self._early = self._early, []
            return early
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from err
        if response is grpc.aio.EOF:
            return None
        return list(response.messages)

    async def send(self, messages: Sequence[dispatch_pb2.AgentMessage]) -> None:
        """Write `messages` as one ConnectRequest."""
        await self._write(dispatch_pb2.ConnectRequest(messages=list(messages)))

    async def _write(self, request: dispatch_pb2.ConnectRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from err
        except asyncio.InvalidStateError as err:  # ended meanwhile: read() says how
            raise UnavailableError(
                "the work stream is closed", request_id=self.request_id, method=_METHOD
            ) from err

    async def done_writing(self) -> None:
        """Half-close: the server answers what it received, then ends with OK."""
        with contextlib.suppress(asyncio.InvalidStateError):
            await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()


class Outbox:
    """An agent's AgentMessages until answered, across its work streams.

    Used from one event loop. A future from `submit()` resolves with the item's
    AgentMessageResult, or with None once the outbox is closed (no stream will
    carry it: send it another way).
    """

    def __init__(self, batch_bytes: int = BATCH_BYTES) -> None:
        self.batch_bytes = batch_bytes
        self._ids = itertools.count(1)
        # Unanswered items by id, in the order they were submitted.
        self._pending: dict[int, tuple[dispatch_pb2.AgentMessage, _Answer]] = {}
        self._unsent: deque[int] = deque()
        self._ready = asyncio.Event()
        self._ending = False
        self.closed = False

    @property
    def pending(self) -> int:
        """How many items wait for their answer."""
        return len(self._pending)

    def submit(self, message: dispatch_pb2.AgentMessage, *, first: bool = False) -> _Answer:
        """Queue `message` under a new id (set on it). `first`: ahead of what
        waits to be sent."""
        future: _Answer = asyncio.get_running_loop().create_future()
        if self.closed or self._ending:
            future.set_result(None)
            return future
        message.id = next(self._ids)
        self._pending[message.id] = (message, future)
        if first:
            self._unsent.appendleft(message.id)
        else:
            self._unsent.append(message.id)
        self._ready.set()
        return future

    def withdraw(self, item_id: int) -> None:
        """Forget an item: not sent again, its answer ignored."""
        entry = self._pending.pop(item_id, None)
        if entry is not None and not entry[1].done():
            entry[1].cancel()

    def resolve(self, result: dispatch_pb2.AgentMessageResult) -> None:
        """Hand an AgentMessageResult to whoever waits for it."""
        entry = self._pending.pop(result.id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(result)

    def rewind(self) -> None:
        """A new stream is open: everything unanswered goes out again, in order."""
        self._unsent = deque(self._pending)
        if self._unsent:
            self._ready.set()

    def end(self) -> None:
        """No more items: `take()` returns [] once what is queued has been sent."""
        self._ending = True
        self._ready.set()

    def close(self) -> None:
        """No stream will carry anything any more: every waiting future gets None."""
        self.closed = True
        self._ready.set()
        pending, self._pending = self._pending, {}
        self._unsent.clear()
        for _, future in pending.values():
            if not future.done():
                future.set_result(None)

    async def take(self) -> list[dispatch_pb2.AgentMessage]:
        """Everything ready now (up to `batch_bytes`), waiting for at least one
        item, never for more. [] once ended (or closed) and nothing is left."""
        while True:
            while not self._unsent:
                if self._ending or self.closed:
                    return []
                self._ready.clear()
                await self._ready.wait()
            batch: list[dispatch_pb2.AgentMessage] = []
            size = 0
            while self._unsent:
                entry = self._pending.get(self._unsent[0])
                if entry is None:  # withdrawn
                    self._unsent.popleft()
                    continue
                cost = entry[0].ByteSize()
                if batch and size + cost > self.batch_bytes:
                    break
                batch.append(entry[0])
                size += cost
                self._unsent.popleft()
            if batch:
                return batch


def on_refusal(future: _Answer, report: Callable[[OpsCoreError], None]) -> None:
    """Call `report` with the error if the item behind `future` is refused
    (for items nobody awaits)."""

    def done(f: _Answer) -> None:
        result = None if f.cancelled() else f.result()
        error = None if result is None else error_from_result(result)
        if error is not None:
            report(error)

    future.add_done_callback(done)


def hello(
    agent_id: str, capabilities: Iterable[str], max_in_flight: int
) -> dispatch_pb2.ConnectHello:
    return dispatch_pb2.ConnectHello(
        agent_id=agent_id, capabilities=list(capabilities), max_in_flight=max_in_flight
    )
