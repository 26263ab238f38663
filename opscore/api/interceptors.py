"""Every cross-cutting concern of an RPC, in one place: authentication, request ids,
one structured log line per RPC, and the translation of domain errors to statuses."""

from __future__ import annotations

import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
import grpc.aio

from opscore import errors
from opscore.api.errors import rich_status, status_code

log = logging.getLogger("opscore.rpc")

_request_id_var: ContextVar[str] = ContextVar("opscore_request_id", default="")


async def stream_ready(context: grpc.aio.ServicerContext) -> None:
    """Streaming servicers call this once their subscription or watch is registered:
    the initial metadata (carrying x-request-id) then tells the client that
    everything from now on reaches it."""
    await context.send_initial_metadata((("x-request-id", _request_id_var.get()),))


# Standard services that probes and tools call without a key.
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class OpsCoreInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: frozenset[str]) -> None:
        self._keys = [k.encode() for k in api_keys]
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return handler
        wrapped = self._wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped

    # ------------------------------------------------------------------ auth

    def _check_auth(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if not self._keys or method.startswith(_EXEMPT_PREFIXES):
            return
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
                break
        if not header:
            raise errors.Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'",
                reason="API_KEY_MISSING",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated(
                "malformed authorization metadata: expected 'Bearer <key>'",
                reason="API_KEY_MALFORMED",
            )
        supplied = token.strip().encode()
        # Compare against every key in constant time so timing reveals nothing.
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(k, supplied)
        if not ok:
            raise errors.Unauthenticated("API key not recognised", reason="API_KEY_INVALID")

    # ------------------------------------------------------------------ wrapping

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in the API

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            rid = _request_id(context)
            context.set_trailing_metadata((("x-request-id", rid),))
            code = grpc.StatusCode.OK
            try:
                self._check_auth(method, context)
                return await behavior(request, context)
            except BaseException as exc:
                code, message, md = _classify(exc, context, method, rid)
                if message is None:
                    raise
                await context.abort(code, message, trailing_metadata=md)
            finally:
                _log(method, code, started, context, request, rid)

        return call

    def _stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            rid = _request_id(context)
            code = grpc.StatusCode.OK
            _request_id_var.set(rid)
            try:
                self._check_auth(method, context)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    await result  # a handler that sends with context.write()
                else:
                    async for response in result:
                        yield response
            except BaseException as exc:
                code, message, md = _classify(exc, context, method, rid)
                if message is None:
                    raise
                await context.abort(code, message, trailing_metadata=md)
            finally:
                _log(method, code, started, context, request, rid)

        return call


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return (value if isinstance(value, str) else value.decode())[:128]
    return uuid.uuid4().hex


def _classify(
    exc: BaseException, context: grpc.aio.ServicerContext, method: str, rid: str
) -> tuple[grpc.StatusCode, str | None, tuple[tuple[str, str | bytes], ...]]:
    """The status for `exc`. A None message means grpc already handles it
    (an abort the handler did itself, or a cancellation): re-raise it."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, None, ()  # type: ignore[return-value]
    if not isinstance(exc, Exception):
        return grpc.StatusCode.CANCELLED, None, ()
    md: tuple[tuple[str, str | bytes], ...] = (("x-request-id", rid),)
    if isinstance(exc, errors.OpsCoreError):
        code = status_code(exc)
        md += (("grpc-status-details-bin", rich_status(exc, code).SerializeToString()),)
        return code, exc.message, md
    log.error(
        "unhandled exception in %s",
        method,
        exc_info=exc,
        extra={"method": method, "request_id": rid},
    )
    message = f"internal error (request id {rid}); the server log has the details"
    return grpc.StatusCode.INTERNAL, message, md


def _log(
    method: str,
    code: grpc.StatusCode,
    started: float,
    context: grpc.aio.ServicerContext,
    request: Any,
    rid: str,
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "rpc",
        extra={
            "method": method,
            "code": code.name,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "peer": context.peer(),
            "agent_id": getattr(request, "agent_id", "") or None,
            "request_id": rid,
        },
    )
