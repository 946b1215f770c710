"""Errors the REST API answers with, each carrying its HTTP status.

ApiError                  any refusal, sent as ``{"error": message}``
 ├── BadRequestError      malformed parameter or body                    400
 ├── UnauthorizedError    admin endpoint called without a bearer token   401
 ├── ForbiddenError       wrong admin token, or the admin API is off     403
 ├── NotFoundError        unknown round, client or model                 404
 └── DependencyError      Redis or the broker did not answer             503
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "BadRequestError",
    "DependencyError",
    "ForbiddenError",
    "NotFoundError",
    "UnauthorizedError",
]


class ApiError(Exception):
    """Root of the errors a handler raises on purpose; the message is safe to send."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ApiError):
    """A query parameter or the request body is malformed or out of range."""

    status = 400


class UnauthorizedError(ApiError):
    """An admin endpoint was called without ``Authorization: Bearer <token>``."""

    status = 401


class ForbiddenError(ApiError):
    """The admin token is wrong, or no admin token is configured."""

    status = 403


class NotFoundError(ApiError):
    """The round, client or model named in the request does not exist."""

    status = 404


class DependencyError(ApiError):
    """Redis or the message broker could not answer the request."""

    status = 503
