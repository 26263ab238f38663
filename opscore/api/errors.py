"""The one table from domain errors to gRPC status codes.

Each status carries google.rpc.Status details: an ErrorInfo with a stable `reason`
and domain "opscore", plus BadRequest field violations for validation errors, so
clients in any language can act on them.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from opscore import errors

DOMAIN = "opscore"

STATUS_BY_ERROR: dict[type[errors.OpsCoreError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: errors.OpsCoreError) -> grpc.StatusCode:
    # Walk the MRO so subclasses inherit their parent's code.
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(exc: errors.OpsCoreError, code: grpc.StatusCode) -> status_pb2.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))
    details.append(info)
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
        details.append(bad)
    return status_pb2.Status(
        code=getattr(code_pb2, code.name), message=exc.message, details=details
    )
