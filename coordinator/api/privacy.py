"""Clients and their privacy: ``/v1/clients``, budgets and the ε trade-off table.

ε is infinite for a client that trained without DP; JSON has no infinity, so such
values are sent as ``null``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from quart import Blueprint, request

from coordinator.api.auth import require_admin
from coordinator.api.context import api_context
from coordinator.api.errors import BadRequestError, NotFoundError
from coordinator.api.params import parse_float, parse_float_list, parse_int
from coordinator.privacy import ACCOUNTANTS, tradeoff_table
from fedq.state import keys

__all__ = ["blueprint"]

log = logging.getLogger(__name__)

blueprint = Blueprint("privacy", __name__)

_MAX_NOISE_LEVELS = 32


@blueprint.get("/v1/clients")
async def clients() -> dict[str, Any]:
    """Registered clients with their last contact, data size and ε against budget."""
    ctx = api_context()
    registered = await ctx.store.clients()
    spent = {row["client_id"]: row for row in await ctx.ledger.report()}

    rows = []
    for client in registered:
        row = spent.get(client.client_id) or await _unspent(client.client_id)
        rows.append(
            {
                "client_id": client.client_id,
                "num_examples": client.num_examples,
                "joined_at": client.joined_at,
                "last_seen": client.last_seen,
                "epsilon_spent": _finite(row["epsilon_spent"]),
                "epsilon_budget": row["epsilon_budget"],
                "remaining": row["remaining"],
                "rounds": row["rounds"],
            }
        )
    return {"clients": rows, "count": len(rows), "delta": ctx.ledger.delta}


@blueprint.get("/v1/clients/<client_id>/privacy")
async def client_privacy(client_id: str) -> dict[str, Any]:
    """ε spent, budget, what remains and every charge of one client."""
    await _require_known(client_id)
    return await _privacy_of(client_id)


@blueprint.put("/v1/clients/<client_id>/budget")
async def set_budget(client_id: str) -> dict[str, Any]:
    """Give a client its own ε budget (admin)."""
    require_admin()
    eps = _budget_from(await request.get_data())  # bytes: a body need not be UTF-8
    await _require_known(client_id)

    await api_context().ledger.set_budget(client_id, eps)
    log.info("client %s budget set to ε %g through the admin API", client_id, eps)
    return await _privacy_of(client_id)


@blueprint.delete("/v1/clients/<client_id>/budget")
async def clear_budget(client_id: str) -> dict[str, Any]:
    """Return a client to the default ε budget (admin)."""
    require_admin()
    await _require_known(client_id)

    await api_context().ledger.clear_budget(client_id)
    log.info("client %s budget reset to the default through the admin API", client_id)
    return await _privacy_of(client_id)


@blueprint.get("/v1/privacy/tradeoff")
async def tradeoff() -> dict[str, Any]:
    """ε after a number of rounds for each noise multiplier (defaults: the configured plan)."""
    settings = api_context().settings
    plan, args = settings.plan, request.args
    noise = parse_float_list(
        "noise",
        args.get("noise"),
        default=[plan.noise_multiplier],
        max_items=_MAX_NOISE_LEVELS,
        low=0.0,
    )
    sample_rate = parse_float(
        "sample_rate", args.get("sample_rate"), default=plan.sample_rate, low=0.0, high=1.0
    )
    local_steps = parse_int(
        "local_steps",
        args.get("local_steps"),
        default=plan.local_steps,
        minimum=1,
        maximum=1_000_000,
    )
    rounds = parse_int(
        "rounds", args.get("rounds"), default=settings.rounds, minimum=0, maximum=100_000
    )
    delta = parse_float(
        "delta", args.get("delta"), default=settings.delta, low=0.0, high=1.0, high_open=True
    )
    accountant = args.get("accountant") or settings.accountant
    if accountant not in ACCOUNTANTS:
        raise BadRequestError(
            f"accountant must be one of {', '.join(sorted(ACCOUNTANTS))}, got {accountant!r}"
        )

    # Opacus accounting takes tens of milliseconds per row: keep it off the event loop.
    table = await asyncio.to_thread(
        tradeoff_table,
        noise,
        sample_rate=sample_rate,
        local_steps=local_steps,
        rounds=rounds,
        delta=delta,
        accountant=accountant,
    )
    return {"accountant": accountant, "table": [_jsonable(row) for row in table]}


async def _privacy_of(client_id: str) -> dict[str, Any]:
    ledger = api_context().ledger
    history = await ledger.history(client_id)
    spent, budget = await ledger.spent(client_id), await ledger.budget(client_id)
    return {
        "client_id": client_id,
        "epsilon_spent": _finite(spent),
        "epsilon_budget": budget,
        "remaining": max(budget - spent, 0.0),
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "history": [charge.to_dict() for charge in history],
    }


async def _unspent(client_id: str) -> dict[str, Any]:
    budget = await api_context().ledger.budget(client_id)
    return {"epsilon_spent": 0.0, "epsilon_budget": budget, "remaining": budget, "rounds": 0}


async def _require_known(client_id: str) -> None:
    """Refuse a client that neither registered nor has charges on the ledger."""
    ctx = api_context()
    if await ctx.store.redis.exists(keys.client(client_id)):
        return
    if await ctx.ledger.history(client_id):
        return
    raise NotFoundError(f"client {client_id!r} is not registered")


def _budget_from(body: bytes | str) -> float:
    """The ε of a ``{"epsilon": <number > 0>}`` body."""
    try:
        payload = json.loads(body)
    except ValueError:  # UnicodeDecodeError too
        raise BadRequestError('body must be JSON like {"epsilon": 8.0}') from None
    if not isinstance(payload, dict) or "epsilon" not in payload:
        raise BadRequestError('body must be a JSON object with "epsilon", like {"epsilon": 8.0}')

    raw = payload["epsilon"]
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise BadRequestError(f"epsilon must be a number, got {json.dumps(raw)}")
    try:
        eps = float(raw)
    except OverflowError:
        eps = math.inf
    if not math.isfinite(eps) or eps <= 0:
        raise BadRequestError(f"epsilon must be a finite number > 0, got {raw}")
    return eps


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) if isinstance(v, float) else v for k, v in row.items()}
