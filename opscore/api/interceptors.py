"""Every cross-cutting concern of an RPC, in one place: authentication and
authorization, request ids, one structured log line per RPC, request decoding,
and the translation of domain errors to statuses.

Each call, before any engine runs: authenticate (API key from the metadata, or
the mTLS client certificate), check the role against opscore.security.roles,
decode the body, then, for agent-scoped calls, check that the principal may act
as the request's `agent_id`. Refusals carry ErrorInfo with a stable reason
(API_KEY_*, CERTIFICATE_NOT_RECOGNISED, ROLE_NOT_ALLOWED, AGENT_NOT_ALLOWED).
The principal is then available to the servicer (`security.current_principal()`).
Open streams are registered under their principal: `revalidate()` (after the
auth file is re-read on SIGHUP) ends those whose principal was revoked with
UNAUTHENTICATED, and those it no longer permits with PERMISSION_DENIED.

Two rules keep a hostile or vanishing client from hurting the server:

- A call is authenticated and its role checked before its body is decoded, so
  an unauthenticated client costs no parsing (and cannot reach the decoder).
  Unary request bodies reach the wrapper as bytes and are decoded after the
  checks; streamed requests are decoded as the servicer reads them, which is
  after the checks too. Failed authentications get no per-RPC log line: they
  go to the rate-limited audit log (opscore.security.audit) instead.
- Nothing touches a call's context after the call may have ended. gRPC core's
  `context.peer()` reads memory owned by the transport, which a client that
  cancels and disconnects frees (grpc/grpc#29069, #29927): the peer and every
  other field the log line needs are read once, when the call starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from opscore import errors, limits
from opscore.api import nul
from opscore.api.errors import rich_status, status_code
from opscore.ids import new_token
from opscore.security import roles
from opscore.security.audit import AuthFailures
from opscore.security.authn import Authenticator
from opscore.security.principal import CallAuth, agent_not_allowed, current_call, set_current_call

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
    auth = current_call()
    if auth is None or auth.task is None:
        await context.send_initial_metadata((("x-request-id", _request_id_var.get()),))
        return
    # Not interruptible while gRPC holds the send: a revocation that cancelled us
    # here would leave the send pending, gRPC would then refuse the status
    # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and the client never hear why.
    auth.inside = False
    try:
        await context.send_initial_metadata((("x-request-id", _request_id_var.get()),))
    finally:
        auth.inside = True
    if auth.ended is not None:
        raise auth.ended  # revoked meanwhile


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


class HoldsNul:
    """What a request stream's deserializer returns for a message with a NUL in
    one of its strings (opscore.api.nul): the servicer says which part to refuse."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message


def _decoder(
    deserializer: Callable[[bytes], Any] | None, *, stream: bool = False
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception as exc:  # any decode failure is the client's
            return Undecodable(str(exc) or type(exc).__name__)
        if stream and nul.may_hold_nul(data) and nul.nul_field(message) is not None:
            return HoldsNul(message)
        return message

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
    """What authentication, the log line and error replies need, read once when
    the call starts."""

    __slots__ = (
        "auth",
        "authorization",
        "fields",
        "metadata",
        "method",
        "peer",
        "quiet",
        "request_id",
        "started",
        "subject",
        "trace_id",
    )

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        metadata: Metadata,
        *,
        peer_identity: bool = False,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.started = time.perf_counter()
        self.request_id = _request_id(metadata)
        self.trace_id = ""

        self.peer = context.peer()
        self.authorization = _metadata_value(metadata, "authorization")
        self.subject = _subject(context) if peer_identity else None
        self.auth: CallAuth | None = None
        # No per-RPC log line (a failed authentication: the audit log has it).
        self.quiet = False
        # What the handler adds to the call's log line (note_call).
        self.fields: dict[str, Any] | None = None


# The call being handled: lets a long-lived stream's handler put what it counted
# on the one line logged when the stream ends, instead of a line per message.
_CURRENT: ContextVar[_Call | None] = ContextVar("opscore_call", default=None)


def note_call(**fields: Any) -> None:
    """Add `fields` to the log line of the call being handled (if any)."""
    call = _CURRENT.get()
    if call is not None:
        if call.fields is None:
            call.fields = {}
        call.fields.update(fields)


class OpsCoreInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator | None = None,
        *,
        rpc_metrics: Callable[[str], RpcMetrics] | None = None,
        tracer: RpcTracer | None = None,
    ) -> None:
        # Observability hooks, None when off (then the calls below skip them).
        self._rpc_metrics = rpc_metrics
        self._tracer = tracer
        self.authenticator = authenticator or Authenticator()
        self.auth_failures = AuthFailures()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        # Open streams of authenticated principals, for revocation.
        self._streams: set[CallAuth] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    # ------------------------------------------------------------------ auth

    def _call(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        return _Call(
            method,
            context,
            context.invocation_metadata() or (),
            peer_identity=self.authenticator.client_certificates,
        )

    def _admit(self, call: _Call) -> CallAuth | None:
        """Authenticate and check the role: before the body is decoded."""
        if call.method.startswith(_EXEMPT_PREFIXES):
            return None
        try:
            principal, credential = self.authenticator.authenticate(
                call.authorization, call.subject
            )
        except errors.Unauthenticated as exc:
            call.quiet = True
            self.auth_failures.record(exc.reason, call.peer, call.method)
            raise
        call.auth = CallAuth(principal, credential, call.method)
        if not roles.permits(principal.role, call.method):
            raise errors.PermissionDenied(
                f"principal {principal.name!r} (role {principal.role}) may not call "
                f"{roles.short_name(call.method)}",
                reason="ROLE_NOT_ALLOWED",
            )
        return call.auth

    @staticmethod
    def _check_agent(auth: CallAuth | None, request: Any) -> None:
        """Agent-scoped calls: the principal must be allowed the request's agent_id."""
        if auth is None or not roles.agent_scoped(auth.method):
            return
        agent_id = getattr(request, "agent_id", "")
        if not auth.principal.allows_agent(agent_id):
            raise agent_not_allowed(auth.principal, agent_id)
        auth.agent_ids.append(agent_id)

    def revalidate(self) -> int:
        """After the principals changed: end every open stream whose principal is
        gone (UNAUTHENTICATED) or no longer allowed the call (PERMISSION_DENIED).
        Returns how many were ended."""
        ended = 0
        for auth in list(self._streams):
            if auth.ended is not None:
                continue
            now = self.authenticator.resolve(auth.credential)
            if now == auth.principal:
                continue
            error: errors.OpsCoreError | None = None
            if now is None:
                error = errors.Unauthenticated(
                    f"the credentials of principal {auth.principal.name!r} were revoked",
                    reason="PRINCIPAL_REVOKED",
                )
            elif not roles.permits(now.role, auth.method):
                error = errors.PermissionDenied(
                    f"principal {now.name!r} (role {now.role}) may no longer call "
                    f"{roles.short_name(auth.method)}",
                    reason="ROLE_NOT_ALLOWED",
                )
            else:
                denied = [a for a in auth.agent_ids if not now.allows_agent(a)]
                if denied:
                    error = agent_not_allowed(now, denied[0])
            if error is None:
                auth.principal = now
                continue
            self._end_stream(auth, error)
            ended += 1
        return ended

    def _end_stream(self, auth: CallAuth, error: errors.OpsCoreError) -> None:
        auth.ended = error
        task = auth.task
        if task is None or task.done():
            return
        if auth.inside:
            # Parked in the servicer: the cancellation lands there, its cleanup
            # runs, and the wrapper answers `error`.
            task.cancel()
            return

        # Busy handing a message to gRPC: the wrapper ends the stream after it;
        # a client that does not read is cut off after a grace. (The wrapper
        # clears auth.task once it answers, so this never cuts its answer short.)
        def force() -> None:
            if auth.task is not None and not auth.task.done():
                auth.task.cancel()

        asyncio.get_running_loop().call_later(limits.REVOKED_STREAM_GRACE.total_seconds(), force)

    def close(self) -> None:
        self.auth_failures.close()

    # ------------------------------------------------------------------ wrapping

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = _decoder(handler.request_deserializer)
        stream_decode = _decoder(handler.request_deserializer, stream=True)
        encode = _encoder(handler.response_serializer)
        # Unary requests arrive as bytes (no deserializer) and are decoded by the
        # wrapper once the call is admitted.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, decode),
                response_serializer=encode,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream, decode),
                response_serializer=encode,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream, decode, request_stream=True),
                request_deserializer=stream_decode,
                response_serializer=encode,
            )
        # Client streaming: none in the API today, but never unauthenticated.
        return grpc.stream_unary_rpc_method_handler(
            self._unary(method, handler.stream_unary, decode, request_stream=True),
            request_deserializer=stream_decode,
            response_serializer=encode,
        )

    def _unary(
        self,
        method: str,
        behavior: Callable[..., Any],
        decode: Callable[[bytes], Any] | None,
        *,
        request_stream: bool = False,
    ) -> Callable[..., Any]:
        """A request stream is decoded by its deserializer, as the servicer reads it
        (after admission); a single request by the wrapper, after admission."""

        rpc = self._rpc_metrics(method) if self._rpc_metrics is not None else None
        tracer = self._tracer

        async def call(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            info = self._call(method, context)
            context.set_trailing_metadata((("x-request-id", info.request_id),))
            span = tracer.start(method, info.metadata) if tracer is not None else None
            if span is not None:
                info.trace_id = span.trace_id
            code = grpc.StatusCode.OK
            reported = False
            request: Any = raw if request_stream else None
            try:
                auth = self._admit(info)
                if not request_stream:
                    request = _decode(method, decode, raw)
                    self._check_agent(auth, request)
                if auth is not None:
                    set_current_call(auth)
                return await behavior(request, context)
            except BaseException as exc:
                code, message, md = _classify(exc, context, info)
                if message is None:
                    raise
                # Counted, logged and traced before the status leaves: a client
                # that has its answer finds the call in the metrics and the log.
                reported = True
                _report(rpc, tracer, span, info, code, request, request_stream, True)
                await context.abort(code, message, trailing_metadata=md)
            finally:
                if not reported:
                    _report(rpc, tracer, span, info, code, request, request_stream, True)

        return call

    def _stream(
        self,
        method: str,
        behavior: Callable[..., Any],
        decode: Callable[[bytes], Any] | None,
        *,
        request_stream: bool = False,
    ) -> Callable[..., Any]:
        """A request stream is decoded by its deserializer, as the servicer reads it
        (after admission); a single request by the wrapper, after admission."""

        rpc = self._rpc_metrics(method) if self._rpc_metrics is not None else None
        tracer = self._tracer

        async def call(raw: Any, context: grpc.aio.ServicerContext) -> None:
            info = self._call(method, context)
            _CURRENT.set(info)  # grpc runs each call in a task of its own: no leak
            code = grpc.StatusCode.OK
            _request_id_var.set(info.request_id)
            span = tracer.start(method, info.metadata) if tracer is not None else None
            if span is not None:
                info.trace_id = span.trace_id
            request: Any = raw if request_stream else None
            auth: CallAuth | None = None
            responses: Any = None
            writing = False
            reported = False
            try:
                auth = self._admit(info)
                if not request_stream:
                    request = _decode(method, decode, raw)
                    self._check_agent(auth, request)
                if auth is not None:
                    set_current_call(auth)
                    auth.task = asyncio.current_task()
                    self._streams.add(auth)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    if auth is not None:
                        auth.inside = True
                    await result  # a handler that sends with context.write()
                else:
                    responses = result.__aiter__()
                    while True:
                        if auth is not None:
                            auth.inside = True
                        try:
                            response = await responses.__anext__()
                        except StopAsyncIteration:
                            break
                        finally:
                            if auth is not None:
                                auth.inside = False
                        # We write rather than yield to grpc: a write that races
                        # the client's cancellation fails inside grpc's own loop,
                        # which logs it as an error with a traceback. Here it is
                        # what it is, a client that left.
                        writing = True
                        try:
                            await context.write(response)
                        except (grpc.aio.AbortError, asyncio.CancelledError):
                            raise
                        except Exception:
                            code = grpc.StatusCode.CANCELLED
                            break
                        writing = False
                        if auth is not None and auth.ended is not None:
                            raise auth.ended
            except BaseException as exc:
                if writing and isinstance(exc, asyncio.CancelledError):
                    # Cancelled while a write was stuck (a client that does not
                    # read): no status can get past it; let grpc tear the call down.
                    code = grpc.StatusCode.CANCELLED
                    raise
                if auth is not None and auth.ended is not None:
                    auth.task = None
                    if isinstance(exc, asyncio.CancelledError):
                        # Our own cancellation (revoked): answer with its status.
                        task = asyncio.current_task()
                        if task is not None:
                            task.uncancel()
                        exc = auth.ended
                code, message, md = _classify(exc, context, info)
                if message is None:
                    raise
                # The servicer's cleanup adds to the call's log line; then the call
                # is counted, logged and traced before its status leaves.
                await self._stream_done(auth, responses)
                _report(rpc, tracer, span, info, code, request, request_stream, False)
                reported = True
                await context.abort(code, message, trailing_metadata=md)
            finally:
                if not reported:
                    await self._stream_done(auth, responses)
                    _report(rpc, tracer, span, info, code, request, request_stream, False)

        return call

    async def _stream_done(self, auth: CallAuth | None, responses: Any) -> None:
        if auth is not None:
            self._streams.discard(auth)
        if responses is not None and hasattr(responses, "aclose"):
            # The servicer's cleanup (unsubscribe) runs now, not at GC.
            with contextlib.suppress(BaseException):
                await responses.aclose()


def _report(
    rpc: Any,
    tracer: Any,
    span: Any,
    info: _Call,
    code: grpc.StatusCode,
    request: Any,
    request_stream: bool,
    timed: bool,
) -> None:
    """The call's metrics, log line and span, once per call. Streams are counted
    but not timed (their length is the client's choice)."""
    if rpc is not None:
        rpc.done(code, time.perf_counter() - info.started if timed else None)
    _log(info, code, None if request_stream else request)
    if span is not None:
        tracer.end(span, code, info.request_id)


def _decode(method: str, decode: Callable[[bytes], Any] | None, raw: Any) -> Any:
    if decode is None:
        return raw
    request = decode(raw)
    if isinstance(request, Undecodable):
        raise undecodable_error(method, request)
    nul.check_request(raw, request)
    return request


def _subject(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's subject (RFC 4514 order, as gRPC core
    prints it, e.g. "O=Acme,CN=agent-1"), or None without one."""
    values = context.auth_context().get("x509_subject") or ()
    for value in values:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _metadata_value(metadata: Metadata, key: str) -> str:
    for k, value in metadata:
        if k == key and value:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def _request_id(metadata: Metadata) -> str:
    return _metadata_value(metadata, "x-request-id")[:128] or new_token()


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
    if call.quiet or not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "rpc",
        extra={
            "method": call.method,
            "code": code.name,
            "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "peer": call.peer,
            "agent_id": getattr(request, "agent_id", "") or None,
            "principal": call.auth.principal.name if call.auth is not None else None,
            "request_id": call.request_id,
            **({"trace_id": call.trace_id} if call.trace_id else {}),
            **(call.fields or {}),
        },
    )
