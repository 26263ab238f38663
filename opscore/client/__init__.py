"""Python SDK for Ops-Core.

    from opscore.client import OpsCoreClient

    async with OpsCoreClient("127.0.0.1:50051") as client:
        task = await client.enqueue_task("text.summarize", input={"text": "hello world"})

`OpsCoreClient` is the asyncio client; `OpsCoreClientSync` offers the same
methods, blocking. Both take a target (HOST:PORT, default `$OPSCORE_TARGET`, then
127.0.0.1:50051) and an API key (default `$OPSCORE_API_KEY`), have one method per
RPC with Python-native arguments, return the generated protobuf messages (use
`to_dict` and `to_datetime` on their fields), raise the `OpsCoreError` hierarchy
of `opscore.client.errors`, and retry UNAVAILABLE where a call is safe to repeat.
TLS and mTLS: `tls=TLSConfig.from_files(ca=..., cert=..., key=...)` (or the
`OPSCORE_TLS*` variables; see `opscore.client.tls`).

To run an agent, see `opscore.agent.Agent`. `OpsCoreClient.connect()` opens an
agent's work stream (`WorkStream`, with `Outbox` to keep what it sends until
answered) for those who drive it themselves; the blocking client has no
equivalent.
"""

from opscore.client import errors
from opscore.client._client import (
    DEFAULT_TARGET,
    OpsCoreClient,
    Page,
    RetryConfig,
    TaskRetry,
    enqueue_request,
)
from opscore.client._sync import OpsCoreClientSync
from opscore.client._workstream import Outbox, WorkStream
from opscore.client.convert import to_datetime, to_dict, to_timedelta
from opscore.client.errors import (
    AlreadyExistsError,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OpsCoreError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from opscore.client.tls import TLSConfig

__all__ = [
    "DEFAULT_TARGET",
    "AlreadyExistsError",
    "CallCancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OpsCoreClient",
    "OpsCoreClientSync",
    "OpsCoreError",
    "Outbox",
    "Page",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryConfig",
    "TLSConfig",
    "TaskRetry",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WorkStream",
    "enqueue_request",
    "errors",
    "to_datetime",
    "to_dict",
    "to_timedelta",
]
