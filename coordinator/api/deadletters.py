"""Dead letters: ``/v1/dead-letters`` to list and inspect, requeue and purge (admin)."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint, request

from coordinator.api.auth import require_admin
from coordinator.api.context import api_context
from coordinator.api.errors import BadRequestError, NotFoundError
from coordinator.api.params import parse_int
from fedq.queue.base import ALL_DEAD_LETTERS, DeadLetterSelection
from fedq.queue.deadletters import dead_letter_to_public

__all__ = ["blueprint"]

log = logging.getLogger(__name__)

blueprint = Blueprint("deadletters", __name__)

MAX_IDS = 1000  # ids one requeue or purge request may name
MAX_LIST = 1000


@blueprint.get("/v1/dead-letters")
async def list_dead_letters() -> dict[str, Any]:
    """Dead letters, oldest first: id, reason, round, client, size and when."""
    limit = parse_int("limit", request.args.get("limit"), default=100, minimum=1, maximum=MAX_LIST)
    found = await api_context().queue.dead_letters(limit or 100)
    return {"dead_letters": [dead_letter_to_public(d) for d in found], "count": len(found)}


@blueprint.get("/v1/dead-letters/<path:message_id>")
async def show_dead_letter(message_id: str) -> dict[str, Any]:
    """One dead letter with its headers and, when it decodes, the update it carries."""
    found = await api_context().queue.inspect_dead_letter(message_id)
    if found is None:
        raise NotFoundError(f"no dead letter {message_id!r}")
    return dead_letter_to_public(found)


@blueprint.post("/v1/dead-letters/requeue")
async def requeue_dead_letters() -> dict[str, Any]:
    """Send dead letters back to the workers (admin): ``{"ids": [...]}`` or ``{"all": true}``."""
    require_admin()
    selection = await _selection()

    outcome = await api_context().queue.requeue_dead_letters(selection)
    log.info("admin requeued %d dead letters", len(outcome.done))
    return {"requeued": outcome.done, "missing": outcome.missing}


@blueprint.post("/v1/dead-letters/purge")
async def purge_dead_letters() -> dict[str, Any]:
    """Delete dead letters for good (admin): ``{"ids": [...]}`` or ``{"all": true}``."""
    require_admin()
    selection = await _selection()

    outcome = await api_context().queue.purge_dead_letters(selection)
    log.info("admin purged %d dead letters", len(outcome.done))
    return {"purged": outcome.done, "missing": outcome.missing}


async def _selection() -> DeadLetterSelection:
    """The ids named by the JSON body, or every dead letter for ``{"all": true}``."""
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not body.keys() <= {"ids", "all"}:
        raise BadRequestError('send a JSON object {"ids": ["<id>", ...]} or {"all": true}')

    if "all" in body:
        if body["all"] is not True or "ids" in body:
            raise BadRequestError('"all" must be true and cannot be combined with "ids"')
        return ALL_DEAD_LETTERS

    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
        raise BadRequestError(f'"ids" must be a list of 1 to {MAX_IDS} dead-letter ids')
    if not all(isinstance(i, str) and i for i in ids):
        raise BadRequestError('every entry of "ids" must be a non-empty string')
    return set(ids)
