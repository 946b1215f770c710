"""The REST API and dashboard of the coordinator as a Quart app.

Routes live in blueprints: ``rounds`` (federation, rounds), ``model`` (metadata and
downloads), ``privacy`` (clients, budgets, ε trade-offs), ``ops`` (health,
readiness, queue, metrics) and ``deadletters`` (inspect, requeue, purge). Every
error is JSON ``{"error": message}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quart import Quart, Response, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from coordinator.api import deadletters, model, ops, privacy, rounds
from coordinator.api.context import ApiContext
from coordinator.api.errors import ApiError
from coordinator.privacy import LedgerUnavailableError, PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.queue import QueueUnavailableError, UpdateQueue
from fedq.state import RoundStore, StoreUnavailableError

__all__ = ["create_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Failures of a backing service: the client learns which one, the log gets the details.
_UNAVAILABLE = {
    RedisError: "state store unavailable",
    StoreUnavailableError: "state store unavailable",
    LedgerUnavailableError: "privacy ledger unavailable",
    QueueUnavailableError: "message broker unavailable",
}


def create_app(
    *, store: RoundStore, ledger: PrivacyLedger, queue: UpdateQueue, settings: CoordinatorSettings
) -> Quart:
    """The API over the given store, ledger and queue."""
    app = Quart(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.json.sort_keys = False  # keep fields in the order the handlers build them
    ApiContext(store=store, ledger=ledger, queue=queue, settings=settings).attach(app)

    for blueprint in (
        rounds.blueprint,
        model.blueprint,
        privacy.blueprint,
        ops.blueprint,
        deadletters.blueprint,
    ):
        app.register_blueprint(blueprint)
    app.add_url_rule("/", "dashboard", _dashboard, methods=["GET"])

    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


async def _dashboard() -> Response:
    """The single-page dashboard; it polls the REST endpoints itself."""
    html = (STATIC_DIR / "dashboard.html").read_bytes()
    return Response(html, mimetype="text/html", headers={"Cache-Control": "no-cache"})


async def _api_error(exc: ApiError) -> tuple[dict[str, Any], int, dict[str, str]]:
    log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return {"error": exc.message}, exc.status, headers


async def _http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
    status = exc.code or 500
    message = {
        404: f"no such endpoint: {request.path}",
        405: f"{request.method} is not allowed on {request.path}",
    }.get(status)
    return {"error": message or exc.description or exc.name}, status


async def _unexpected_error(exc: Exception) -> tuple[dict[str, Any], int]:
    for kind, message in _UNAVAILABLE.items():
        if isinstance(exc, kind):
            log.error("%s %s failed: %s: %s", request.method, request.path, message, exc)
            return {"error": message}, 503

    log.exception("%s %s failed unexpectedly", request.method, request.path)
    return {"error": "internal error"}, 500
