"""Errors of the coordinator and gateway, and how each reaches a client.

CoordinatorError
 ├── AuthError               unknown client or wrong token          UNAUTHENTICATED
 ├── RoundStateError         round not open / closed / unknown      FAILED_PRECONDITION
 ├── NotParticipantError     client not selected for the round      PERMISSION_DENIED
 ├── BudgetExhaustedError    client's ε budget is spent             PERMISSION_DENIED
 ├── InvalidUpdateError      bad header, tensors, dtypes, NaN/Inf   INVALID_ARGUMENT
 ├── UpdateTooLargeError     payload over the size bound            RESOURCE_EXHAUSTED
 ├── IntegrityError          truncated stream, checksum mismatch    DATA_LOSS
 ├── ConflictError           another update for the same round      ALREADY_EXISTS
 └── UnavailableError        broker or store did not answer         UNAVAILABLE
"""

from __future__ import annotations

import grpc

__all__ = [
    "AuthError",
    "BudgetExhaustedError",
    "ConflictError",
    "CoordinatorError",
    "IntegrityError",
    "InvalidUpdateError",
    "NotParticipantError",
    "RoundStateError",
    "UnavailableError",
    "UpdateTooLargeError",
    "grpc_status_of",
]


class CoordinatorError(Exception):
    """Root of every error the coordinator or a gateway raises on purpose."""

    code = grpc.StatusCode.INTERNAL
    reason = "internal"


class AuthError(CoordinatorError):
    """The client is unknown or its token does not match."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "auth"


class RoundStateError(CoordinatorError):
    """The round named in a request is not open (closed, finished or unknown)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "round_closed"


class NotParticipantError(CoordinatorError):
    """The client was not selected for the round it submits to."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "not_participant"


class BudgetExhaustedError(CoordinatorError):
    """The client's privacy budget does not allow this update."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "budget_exhausted"


class InvalidUpdateError(CoordinatorError):
    """The update's header or tensors do not fit the model."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid"


class UpdateTooLargeError(CoordinatorError):
    """The update is larger than the configured bound."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too_large"


class IntegrityError(CoordinatorError):
    """The upload stream was truncated or its checksum does not match."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "integrity"


class ConflictError(CoordinatorError):
    """The client already submitted a different update for the round."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "conflict"


class UnavailableError(CoordinatorError):
    """The broker or the store did not answer; the client should retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


def grpc_status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """Status code, client-safe message and metric reason for an exception."""
    if isinstance(exc, CoordinatorError):
        return exc.code, str(exc), exc.reason
    return grpc.StatusCode.INTERNAL, "internal error", "internal"
