"""Every cross-cutting concern of an RPC, in one place: authentication, request ids,
one structured log line per RPC, request decoding, the translation of domain
errors to statuses, and (when configured) RPC metrics and a trace span per RPC.

Two rules keep a hostile or vanishing client from hurting the server:

- Authentication is decided from the call's metadata before its body is decoded,
  so an unauthenticated client costs no parsing (and cannot reach the decoder).
- Nothing touches a call's context after the call may have ended. gRPC core's
  `context.peer()` reads memory owned by the transport, which a client that
  cancels and disconnects frees (grpc/grpc#29069, #29927): the peer and every
  other field the log line needs are read once, when the call starts.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from opscore import errors
from opscore.api.errors import rich_status, status_code

if TYPE_CHECKING:
    # Only when configured: an unobserved server never imports either library.
    from opscore.observability.metrics import RpcMetrics
    from opscore.observability.tracing import RpcTracer

log = logging.getLogger("opscore.rpc")

_request_id_var: ContextVar[str] = ContextVar("opscore_request_id", default="")

Metadata = Sequence[tuple[str, str | bytes]]


async def stream_ready(context: grpc.aio.ServicerContext) -> None:
    """Streaming servicers call this once their subscription or watch is registered:
    the initial metadata (carrying x-request-id) then tells the client that
    everything from now on reaches it."""
    await context.send_initial_metadata((("x-request-id", _request_id_var.get()),))


# Standard services that probes and tools call without a key.
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Undecodable:
    """What the request deserializer returns for a body that is not a valid message
    (garbage, invalid UTF-8, nesting beyond protobuf's limit). The call wrapper
    answers it with INVALID_ARGUMENT; grpc itself would answer UNKNOWN and log a
    traceback per request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # any decode failure is the client's
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


def _encoder(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serializer is None:
        return None

    def encode(message: Any) -> bytes:
        # Events fanned out to many watchers are serialized once, up front.
        if type(message) is bytes:
            return message
        return serializer(message)

    return encode


def undecodable_error(method: str, item: Undecodable) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"the request body is not a valid message for {method}: {item.reason[:200]}",
        reason="MALFORMED_REQUEST",
    )


class _Call:
    """What the log line and error replies need, read once when the call starts."""

    __slots__ = ("method", "peer", "request_id", "started", "trace_id")

    def __init__(self, method: str, context: grpc.aio.ServicerContext, metadata: Metadata) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.request_id = _request_id(metadata)
        self.peer = context.peer()
        self.trace_id = ""


class OpsCoreInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        api_keys: frozenset[str],
        *,
        rpc_metrics: Callable[[str], RpcMetrics] | None = None,
        tracer: RpcTracer | None = None,
    ) -> None:
        self._keys = [k.encode() for k in api_keys]
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._refusals: dict[tuple[str, str], grpc.RpcMethodHandler] = {}
        # Observability hooks, None when off (then the calls below skip them).
        self._rpc_metrics = rpc_metrics
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        metadata: Metadata = details.invocation_metadata or ()  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        refusal = self._check_auth(method, metadata)
        if refusal is not None:
            return self._refusal(method, wrapped, refusal)
        return wrapped

    # ------------------------------------------------------------------ auth

    def _check_auth(self, method: str, metadata: Metadata) -> errors.Unauthenticated | None:
        if not self._keys or method.startswith(_EXEMPT_PREFIXES):
            return None
        header = _metadata_value(metadata, "authorization")
        if not header:
            return errors.Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'",
                reason="API_KEY_MISSING",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return errors.Unauthenticated(
                "malformed authorization metadata: expected 'Bearer <key>'",
                reason="API_KEY_MALFORMED",
            )
        supplied = token.strip().encode()
        # Compare against every key in constant time so timing reveals nothing.
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(k, supplied)
        if not ok:
            return errors.Unauthenticated("API key not recognised", reason="API_KEY_INVALID")
        return None

    def _refusal(
        self, method: str, like: grpc.RpcMethodHandler, error: errors.OpsCoreError
    ) -> grpc.RpcMethodHandler:
        """A handler of the same shape that never decodes the body and answers `error`."""
        key = (method, error.reason)
        cached = self._refusals.get(key)
        if cached is not None:
            return cached
        rpc = self._rpc_metrics(method) if self._rpc_metrics is not None else None

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = context.invocation_metadata() or ()
            call = _Call(method, context, metadata)
            code, message, md = _classify(error, context, call)
            try:
                await context.abort(code, message or "", trailing_metadata=md)
            finally:
                if rpc is not None:
                    rpc.done(code, None)
                _log(call, code, request)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            await refuse(request, context)

        skip = _skip_body
        if like.unary_unary is not None:
            handler = grpc.unary_unary_rpc_method_handler(
                refuse, request_deserializer=skip, response_serializer=like.response_serializer
            )
        elif like.unary_stream is not None:
            handler = grpc.unary_stream_rpc_method_handler(
                refuse_stream,
                request_deserializer=skip,
                response_serializer=like.response_serializer,
            )
        elif like.stream_stream is not None:
            handler = grpc.stream_stream_rpc_method_handler(
                refuse_stream,
                request_deserializer=skip,
                response_serializer=like.response_serializer,
            )
        else:
            handler = grpc.stream_unary_rpc_method_handler(
                refuse, request_deserializer=skip, response_serializer=like.response_serializer
            )
        self._refusals[key] = handler
        return handler

    # ------------------------------------------------------------------ wrapping

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = _decoder(handler.request_deserializer)
        encode = _encoder(handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=decode,
                response_serializer=encode,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=decode,
                response_serializer=encode,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream, request_stream=True),
                request_deserializer=decode,
                response_serializer=encode,
            )
        return handler  # no client-streaming RPCs in the API

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        rpc = self._rpc_metrics(method) if self._rpc_metrics is not None else None
        tracer = self._tracer

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = context.invocation_metadata() or ()
            info = _Call(method, context, metadata)
            context.set_trailing_metadata((("x-request-id", info.request_id),))
            span = tracer.start(method, metadata) if tracer is not None else None
            if span is not None:
                info.trace_id = span.trace_id
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, Undecodable):
                    raise undecodable_error(method, request)
                return await behavior(request, context)
            except BaseException as exc:
                code, message, md = _classify(exc, context, info)
                if message is None:
                    raise
                await context.abort(code, message, trailing_metadata=md)
            finally:
                if rpc is not None:
                    rpc.done(code, time.perf_counter() - info.started)
                _log(info, code, request)
                if span is not None:
                    tracer.end(span, code, info.request_id)  # type: ignore[union-attr]

        return call

    def _stream(
        self, method: str, behavior: Callable[..., Any], *, request_stream: bool = False
    ) -> Callable[..., Any]:
        rpc = self._rpc_metrics(method) if self._rpc_metrics is not None else None
        tracer = self._tracer

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata() or ()
            info = _Call(method, context, metadata)
            code = grpc.StatusCode.OK
            _request_id_var.set(info.request_id)
            span = tracer.start(method, metadata) if tracer is not None else None
            if span is not None:
                info.trace_id = span.trace_id
            try:
                if not request_stream and isinstance(request, Undecodable):
                    raise undecodable_error(method, request)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    await result  # a handler that sends with context.write()
                else:
                    async for response in result:
                        yield response
            except BaseException as exc:
                code, message, md = _classify(exc, context, info)
                if message is None:
                    raise
                await context.abort(code, message, trailing_metadata=md)
            finally:
                if rpc is not None:
                    rpc.done(code, None)
                _log(info, code, None if request_stream else request)
                if span is not None:
                    tracer.end(span, code, info.request_id)  # type: ignore[union-attr]

        return call


def _skip_body(data: bytes) -> None:
    return None


def _metadata_value(metadata: Metadata, key: str) -> str:
    for k, value in metadata:
        if k == key and value:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def _request_id(metadata: Metadata) -> str:
    return _metadata_value(metadata, "x-request-id")[:128] or uuid.uuid4().hex


def _classify(
    exc: BaseException, context: grpc.aio.ServicerContext, call: _Call
) -> tuple[grpc.StatusCode, str | None, tuple[tuple[str, str | bytes], ...]]:
    """The status for `exc`. A None message means grpc already handles it
    (an abort the handler did itself, or a cancellation): re-raise it."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, None, ()  # type: ignore[return-value]
    if not isinstance(exc, Exception):
        return grpc.StatusCode.CANCELLED, None, ()
    md: tuple[tuple[str, str | bytes], ...] = (("x-request-id", call.request_id),)
    if isinstance(exc, errors.OpsCoreError):
        code = status_code(exc)
        md += (("grpc-status-details-bin", rich_status(exc, code).SerializeToString()),)
        return code, exc.message, md
    log.error(
        "unhandled exception in %s",
        call.method,
        exc_info=exc,
        extra={"method": call.method, "request_id": call.request_id},
    )
    message = f"internal error (request id {call.request_id}); the server log has the details"
    return grpc.StatusCode.INTERNAL, message, md


def _log(call: _Call, code: grpc.StatusCode, request: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    extra = {
        "method": call.method,
        "code": code.name,
        "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
        "peer": call.peer,
        "agent_id": getattr(request, "agent_id", "") or None,
        "request_id": call.request_id,
    }
    if call.trace_id:
        extra["trace_id"] = call.trace_id
    log.info("rpc", extra=extra)
