"""Bearer-token check for the admin endpoints."""

from __future__ import annotations

import hmac
import logging

from quart import request

from coordinator.api.context import api_context
from coordinator.api.errors import ForbiddenError, UnauthorizedError

__all__ = ["require_admin"]

log = logging.getLogger(__name__)


def require_admin() -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <admin token>``.

    Raises:
        ForbiddenError: no admin token is configured, or the token does not match.
        UnauthorizedError: the request has no bearer token.
    """
    expected = api_context().settings.admin_token
    if not expected:
        raise ForbiddenError("admin API disabled: set FEDQ_ADMIN_TOKEN")

    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        log.warning("admin %s %s refused: no bearer token", request.method, request.path)
        raise UnauthorizedError("admin endpoint: send 'Authorization: Bearer <admin token>'")

    # Compare bytes: compare_digest refuses non-ASCII str, and a header may hold anything.
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        log.warning("admin %s %s refused: wrong token", request.method, request.path)
        raise ForbiddenError("admin token does not match")
