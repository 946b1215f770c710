"""Per-client privacy ledger in Redis: what each client has spent and may still spend.

ε is charged when a plan is handed out, not when its update arrives: a client that
trained and sent an update has released it whether or not we later accept it (it may be
lost, late or refused, yet still have been observed on the way). Charging on hand-out
errs on the side of over-counting, which is the safe direction for a privacy guarantee.

Keys (all under ``prefix``):

- ``ledger:{client_id}``: hash, round -> JSON ``Charge``; written once per round (HSETNX).
- ``budget:{client_id}``: string, ε budget overriding the ledger's default.
- ``ledger_clients``: set of client ids with at least one charge.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError, WatchError

from fedq.plan import TrainingPlan

from .accountant import Charge, epsilon

__all__ = ["BudgetExceededError", "LedgerUnavailableError", "PrivacyLedger", "PrivacyLedgerError"]

log = logging.getLogger(__name__)

CHARGES_KEY = "{prefix}ledger:{client_id}"
BUDGET_KEY = "{prefix}budget:{client_id}"
CLIENTS_KEY = "{prefix}ledger_clients"

_MAX_WATCH_RETRIES = 20
_MAX_HISTORIES = 4096  # distinct charge histories whose ε is kept


class PrivacyLedgerError(Exception):
    """Root of the ledger's errors."""


class LedgerUnavailableError(PrivacyLedgerError):
    """Raised when Redis cannot be reached or keeps changing under a charge."""


class BudgetExceededError(PrivacyLedgerError):
    """Raised when handing a plan to a client would take it past its ε budget."""

    def __init__(self, client_id: str, *, spent: float, budget: float, would_reach: float):
        self.client_id = client_id
        self.spent = spent
        self.budget = budget
        self.would_reach = would_reach
        super().__init__(
            f"client {client_id} privacy budget exhausted: ε spent {spent:.2f} of "
            f"{budget:.2f} allowed; next round would reach {would_reach:.2f}"
        )


class PrivacyLedger:
    """ε spent and allowed per client, kept in Redis so it survives coordinator restarts."""

    def __init__(
        self,
        redis: Any,
        *,
        delta: float,
        default_budget: float,
        accountant: str = "rdp",
        prefix: str = "fedq:",
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta {delta} must be in (0, 1)")
        if not default_budget > 0:
            raise ValueError(f"default_budget {default_budget} must be > 0")
        epsilon([], delta=delta, accountant=accountant)  # rejects an unknown accountant now

        self._redis = redis
        self.delta = delta
        self.default_budget = float(default_budget)
        self.accountant = accountant
        self.prefix = prefix
        self._cache = _EpsilonCache()

    async def charge(self, client_id: str, plan: TrainingPlan, *, enforce: bool = True) -> float:
        """Record ``plan``'s charge for its round and return the ε spent after it.

        Charging a round already on the ledger records nothing and returns the current ε.
        With ``enforce`` (the default) a charge that would exceed the budget is not recorded
        and ``BudgetExceededError`` is raised instead; check and write are one transaction.
        """
        _check_client_id(client_id)
        new = Charge.from_plan(plan)

        async with self._errors(f"charge client {client_id} round {new.round}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(_MAX_WATCH_RETRIES):
                    try:
                        return await self._charge_once(pipe, client_id, new, enforce=enforce)
                    except WatchError:
                        log.debug("client %s ledger changed during charge; retrying", client_id)
                        continue

        raise LedgerUnavailableError(
            f"client {client_id} round {new.round}: ledger kept changing during "
            f"{_MAX_WATCH_RETRIES} attempts to charge it; try again"
        )

    async def spent(self, client_id: str) -> float:
        """ε the client has spent so far."""
        _check_client_id(client_id)
        key = self._charges_key(client_id)

        async with self._errors(f"read ledger of client {client_id}"):
            cached = self._cache.spent(client_id, await self._redis.hlen(key))
            if cached is not None:
                return cached
            charges = _decode_charges(await self._redis.hgetall(key))

        return await self._spent_of(client_id, charges)

    async def standing(self, client_id: str) -> tuple[float, float]:
        """ε the client has spent and its ε budget, read in one round trip."""
        _check_client_id(client_id)
        async with self._errors(f"read ledger of client {client_id}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self._charges_key(client_id))
            pipe.get(self._budget_key(client_id))
            raw_charges, raw_budget = await pipe.execute()

        budget = self.default_budget if raw_budget is None else float(_text(raw_budget))
        return await self._spent_of(client_id, _decode_charges(raw_charges)), budget

    async def budget(self, client_id: str) -> float:
        """The client's ε budget: its override if set, else the ledger's default."""
        _check_client_id(client_id)
        async with self._errors(f"read budget of client {client_id}"):
            raw = await self._redis.get(self._budget_key(client_id))
        return self.default_budget if raw is None else float(_text(raw))

    async def set_budget(self, client_id: str, epsilon: float) -> None:
        """Give the client its own ε budget instead of the default."""
        _check_client_id(client_id)
        if not epsilon > 0:
            raise ValueError(f"client {client_id}: budget ε {epsilon} must be > 0")

        async with self._errors(f"set budget of client {client_id}"):
            await self._redis.set(self._budget_key(client_id), repr(float(epsilon)))
        log.info("client %s budget set to ε %.3f", client_id, epsilon)

    async def clear_budget(self, client_id: str) -> None:
        """Return the client to the default budget."""
        _check_client_id(client_id)
        async with self._errors(f"clear budget of client {client_id}"):
            await self._redis.delete(self._budget_key(client_id))
        log.info("client %s budget reset to default ε %.3f", client_id, self.default_budget)

    async def can_afford(self, client_id: str, plan: TrainingPlan) -> tuple[bool, float]:
        """Whether charging ``plan`` keeps the client within budget, and the ε it would reach."""
        _check_client_id(client_id)
        new = Charge.from_plan(plan)
        key = self._charges_key(client_id)

        async with self._errors(f"read ledger of client {client_id}"):
            charges = _decode_charges(await self._redis.hgetall(key))
        budget = await self.budget(client_id)

        would_reach = await self._would_reach(client_id, charges, new)
        return would_reach <= budget, would_reach

    async def history(self, client_id: str) -> list[Charge]:
        """The client's charges in round order."""
        _check_client_id(client_id)
        async with self._errors(f"read ledger of client {client_id}"):
            raw = await self._redis.hgetall(self._charges_key(client_id))
        return _decode_charges(raw)

    async def report(self) -> list[dict[str, Any]]:
        """ε spent, budget and remaining for every client on the ledger, sorted by id."""
        async with self._errors("list ledger clients"):
            members = await self._redis.smembers(CLIENTS_KEY.format(prefix=self.prefix))

        rows = []
        for client_id in sorted(_text(m) for m in members):
            charges = await self.history(client_id)
            spent = await self._spent_of(client_id, charges)
            budget = await self.budget(client_id)
            rows.append(
                {
                    "client_id": client_id,
                    "epsilon_spent": spent,
                    "epsilon_budget": budget,
                    "remaining": max(budget - spent, 0.0),
                    "rounds": len(charges),
                }
            )
        return rows

    async def _charge_once(self, pipe: Any, client_id: str, new: Charge, *, enforce: bool) -> float:
        """One optimistic attempt: watch, read, decide, write; WatchError means retry."""
        key = self._charges_key(client_id)
        budget_key = self._budget_key(client_id)
        await pipe.watch(key, budget_key)
        charges = _decode_charges(await pipe.hgetall(key))
        raw_budget = await pipe.get(budget_key)
        budget = self.default_budget if raw_budget is None else float(_text(raw_budget))

        if any(c.round == new.round for c in charges):
            await pipe.unwatch()
            return await self._already_charged(client_id, charges, new)

        would_reach = await self._would_reach(client_id, charges, new)
        if enforce and would_reach > budget:
            await pipe.unwatch()
            spent = await self._spent_of(client_id, charges)
            raise BudgetExceededError(
                client_id, spent=spent, budget=budget, would_reach=would_reach
            )

        pipe.multi()
        pipe.hsetnx(key, str(new.round), json.dumps(new.to_dict()))
        pipe.sadd(CLIENTS_KEY.format(prefix=self.prefix), client_id)
        await pipe.execute()

        # WATCH guarantees the stored ledger is now exactly ``charges`` plus ``new``.
        self._cache.put_spent(client_id, len(charges) + 1, would_reach)
        log.info(
            "client %s charged round %d: ε %.3f of %.3f", client_id, new.round, would_reach, budget
        )
        return would_reach

    async def _already_charged(self, client_id: str, charges: list[Charge], new: Charge) -> float:
        """ε for a repeated charge of a round: nothing is recorded twice."""
        stored = next(c for c in charges if c.round == new.round)
        if stored != new:
            # NOTE: the first plan handed out for a round is what the client may have run;
            # a different plan for the same round does not replace it.
            log.warning(
                "client %s round %d already charged as %s; ignoring %s",
                client_id,
                new.round,
                stored,
                new,
            )
        else:
            log.debug("client %s round %d already charged", client_id, new.round)
        return await self._spent_of(client_id, charges)

    async def _spent_of(self, client_id: str, charges: list[Charge]) -> float:
        """ε of a client's stored charges, from the cache when the count matches."""
        cached = self._cache.spent(client_id, len(charges))
        if cached is not None:
            return cached

        eps = await self._compute(charges)
        self._cache.put_spent(client_id, len(charges), eps)
        return eps

    async def _would_reach(self, client_id: str, charges: list[Charge], new: Charge) -> float:
        """ε after adding ``new`` to a client's stored charges."""
        if any(c.round == new.round for c in charges):
            return await self._spent_of(client_id, charges)
        cached = self._cache.next(client_id, len(charges), new)
        if cached is not None:
            return cached

        eps = await self._compute([*charges, new])
        self._cache.put_next(client_id, len(charges), new, eps)
        return eps

    async def _compute(self, charges: list[Charge]) -> float:
        # Clients handed the same plans share a history, so a gateway computes each
        # distinct one once instead of once per client and round.
        history = tuple((c.dp_mode, c.noise_multiplier, c.sample_rate, c.steps) for c in charges)
        eps = self._cache.of_history(history)
        if eps is not None:
            return eps

        # Accounting takes tens of milliseconds (more with PRV): keep it off the event loop.
        eps = await asyncio.to_thread(
            epsilon, charges, delta=self.delta, accountant=self.accountant
        )
        self._cache.put_history(history, eps)
        return eps

    def _charges_key(self, client_id: str) -> str:
        return CHARGES_KEY.format(prefix=self.prefix, client_id=client_id)

    def _budget_key(self, client_id: str) -> str:
        return BUDGET_KEY.format(prefix=self.prefix, client_id=client_id)

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        """Turn Redis failures into ``LedgerUnavailableError`` naming the operation."""
        try:
            yield
        except RedisError as exc:
            raise LedgerUnavailableError(f"could not {what}: {exc}") from exc


class _EpsilonCache:
    """ε per client, keyed by how many charges the ledger held when it was computed.

    Charges are only ever added, one per round, so the count identifies the ledger's state.
    ε also depends on nothing but the charges' mechanisms in order (not on their rounds),
    so it is kept by that history too.
    """

    def __init__(self) -> None:
        self._spent: dict[str, tuple[int, float]] = {}
        self._next: dict[str, tuple[int, Charge, float]] = {}
        self._histories: dict[tuple[Any, ...], float] = {}

    def spent(self, client_id: str, count: int) -> float | None:
        hit = self._spent.get(client_id)
        return hit[1] if hit is not None and hit[0] == count else None

    def put_spent(self, client_id: str, count: int, eps: float) -> None:
        self._spent[client_id] = (count, eps)

    def next(self, client_id: str, count: int, charge: Charge) -> float | None:
        hit = self._next.get(client_id)
        return hit[2] if hit is not None and hit[:2] == (count, charge) else None

    def put_next(self, client_id: str, count: int, charge: Charge, eps: float) -> None:
        self._next[client_id] = (count, charge, eps)

    def of_history(self, history: tuple[Any, ...]) -> float | None:
        return self._histories.get(history)

    def put_history(self, history: tuple[Any, ...], eps: float) -> None:
        if len(self._histories) >= _MAX_HISTORIES:
            self._histories.clear()
        self._histories[history] = eps


def _decode_charges(raw: dict[Any, Any]) -> list[Charge]:
    charges = [Charge.from_dict(json.loads(_text(value))) for value in raw.values()]
    return sorted(charges, key=lambda c: c.round)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_client_id(client_id: str) -> None:
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id {client_id!r} must be a non-empty string")
