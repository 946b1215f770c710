"""Privacy ledger contract, run against fakeredis and the real Redis."""

import asyncio
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

import coordinator.privacy.ledger as ledger_module
from coordinator.privacy import (
    BudgetExceededError,
    Charge,
    LedgerUnavailableError,
    PrivacyLedger,
    epsilon,
)
from fedq.plan import TrainingPlan
from tests.conftest import _unavailable

REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DELTA = 1e-5


def _plan(round_id: int, **changes) -> TrainingPlan:
    settings = {"noise_multiplier": 1.0, "sample_rate": 0.01, "local_steps": 50, **changes}
    return TrainingPlan(round=round_id, **settings)


def _eps_after(rounds: int) -> float:
    return epsilon([Charge.from_plan(_plan(r)) for r in range(rounds)], delta=DELTA)


class _Backend:
    """Hands out clients to one Redis (fake or real); all see the same data under ``prefix``."""

    def __init__(self, factory: Callable[[], Redis], prefix: str) -> None:
        self.prefix = prefix
        self.clients: list[Redis] = []
        self._factory = factory

    def client(self) -> Redis:
        self.clients.append(self._factory())
        return self.clients[-1]


@pytest.fixture(params=["fakeredis", "redis"])
async def backend(request) -> AsyncIterator[_Backend]:
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        backend = _Backend(lambda: fakeredis.FakeAsyncRedis(server=server), "fedq:")
    else:
        await _require_real_redis()
        backend = _Backend(lambda: Redis.from_url(REDIS_URL), f"fedq-test-{uuid.uuid4().hex}:")

    yield backend

    if request.param == "redis":
        cleaner = backend.client()
        keys = [key async for key in cleaner.scan_iter(match=f"{backend.prefix}*")]
        if keys:
            await cleaner.delete(*keys)
    for client in backend.clients:
        await client.aclose()


async def _require_real_redis() -> None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        _unavailable(f"real Redis at {REDIS_URL} ({exc})")
    finally:
        await client.aclose()


@pytest.fixture
def make_ledger(backend):
    """Build a ledger on a fresh client, as a restarted coordinator would."""

    def make(*, default_budget: float = 10.0, **kwargs) -> PrivacyLedger:
        return PrivacyLedger(
            backend.client(),
            delta=DELTA,
            default_budget=default_budget,
            prefix=backend.prefix,
            **kwargs,
        )

    return make


async def test_charge_records_the_round_and_returns_epsilon_spent(make_ledger):
    ledger = make_ledger()

    eps = await ledger.charge("c1", _plan(0))

    assert eps == pytest.approx(_eps_after(1), rel=1e-12)
    assert await ledger.spent("c1") == eps
    assert await ledger.history("c1") == [Charge.from_plan(_plan(0))]


async def test_charging_the_same_round_twice_records_it_once(make_ledger):
    ledger = make_ledger()

    first = await ledger.charge("c1", _plan(0))
    second = await ledger.charge("c1", _plan(0))
    different_plan = await ledger.charge("c1", _plan(0, local_steps=500))

    assert first == second == different_plan
    assert len(await ledger.history("c1")) == 1


async def test_history_comes_back_in_round_order(make_ledger):
    ledger = make_ledger()
    for round_id in (3, 1, 2):
        await ledger.charge("c1", _plan(round_id))

    history = await ledger.history("c1")

    assert [c.round for c in history] == [1, 2, 3]


async def test_can_afford_refuses_a_plan_that_would_pass_the_budget(make_ledger):
    budget = (_eps_after(2) + _eps_after(3)) / 2
    ledger = make_ledger(default_budget=budget)
    await ledger.charge("c1", _plan(0))

    ok_second = await ledger.can_afford("c1", _plan(1))
    await ledger.charge("c1", _plan(1))
    ok_third = await ledger.can_afford("c1", _plan(2))

    assert ok_second == (True, pytest.approx(_eps_after(2), rel=1e-12))
    assert ok_third == (False, pytest.approx(_eps_after(3), rel=1e-12))
    assert len(await ledger.history("c1")) == 2


async def test_charge_past_the_budget_raises_and_records_nothing(make_ledger):
    budget = (_eps_after(1) + _eps_after(2)) / 2
    ledger = make_ledger(default_budget=budget)
    await ledger.charge("c7", _plan(0))

    with pytest.raises(BudgetExceededError) as info:
        await ledger.charge("c7", _plan(1))

    err = info.value
    assert (err.client_id, err.budget) == ("c7", budget)
    assert err.spent == pytest.approx(_eps_after(1))
    assert err.would_reach == pytest.approx(_eps_after(2))
    assert str(err).startswith("client c7 privacy budget exhausted: ε spent ")
    assert len(await ledger.history("c7")) == 1


async def test_charge_without_enforcement_records_past_the_budget(make_ledger):
    ledger = make_ledger(default_budget=_eps_after(1))

    await ledger.charge("c1", _plan(0))
    eps = await ledger.charge("c1", _plan(1), enforce=False)

    assert eps == pytest.approx(_eps_after(2))
    assert await ledger.can_afford("c1", _plan(2)) == (False, pytest.approx(_eps_after(3)))


async def test_a_round_without_dp_is_never_affordable(make_ledger):
    ledger = make_ledger()

    affordable, would_reach = await ledger.can_afford("c1", _plan(0, dp_mode="none"))

    assert (affordable, would_reach) == (False, math.inf)


async def test_a_budget_override_applies_to_its_client_only_until_cleared(make_ledger):
    ledger = make_ledger(default_budget=_eps_after(1))
    await ledger.set_budget("generous", 100.0)
    await ledger.charge("generous", _plan(0))
    await ledger.charge("strict", _plan(0))

    generous = await ledger.can_afford("generous", _plan(1))
    strict = await ledger.can_afford("strict", _plan(1))
    await ledger.clear_budget("generous")

    assert generous[0] and not strict[0]
    assert await ledger.budget("generous") == _eps_after(1)


async def test_a_budget_must_be_positive(make_ledger):
    ledger = make_ledger()

    with pytest.raises(ValueError, match="budget ε 0"):
        await ledger.set_budget("c1", 0)


async def test_a_new_ledger_over_the_same_redis_sees_the_same_epsilon(make_ledger):
    before = make_ledger()
    for round_id in range(3):
        await before.charge("c1", _plan(round_id))
    await before.set_budget("c1", 5.0)

    after = make_ledger()

    assert await after.spent("c1") == await before.spent("c1")
    assert await after.budget("c1") == 5.0
    assert await after.history("c1") == await before.history("c1")


async def test_report_lists_every_charged_client(make_ledger):
    ledger = make_ledger(default_budget=4.0)
    await ledger.charge("b", _plan(0))
    await ledger.charge("a", _plan(0))
    await ledger.charge("a", _plan(1))

    report = await ledger.report()

    assert [row["client_id"] for row in report] == ["a", "b"]
    assert report[0]["rounds"] == 2
    assert report[0]["epsilon_spent"] == pytest.approx(_eps_after(2))
    assert report[0]["remaining"] == pytest.approx(4.0 - _eps_after(2))


async def test_concurrent_charges_never_pass_the_budget(make_ledger):
    budget = (_eps_after(3) + _eps_after(4)) / 2
    ledgers = [make_ledger(default_budget=budget) for _ in range(3)]

    results = await asyncio.gather(
        *(ledgers[r % 3].charge("c1", _plan(r)) for r in range(8)), return_exceptions=True
    )

    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(refused) == 5
    assert len(await ledgers[0].history("c1")) == 3


async def test_repeated_queries_reuse_the_cached_epsilon(make_ledger, monkeypatch):
    ledger = make_ledger()
    await ledger.charge("c1", _plan(0))
    calls = []

    def counting_epsilon(*args, **kwargs):
        calls.append(args)
        return epsilon(*args, **kwargs)

    monkeypatch.setattr(ledger_module, "epsilon", counting_epsilon)
    for _ in range(3):
        await ledger.spent("c1")
    await ledger.can_afford("c1", _plan(1))
    await ledger.charge("c1", _plan(1))
    await ledger.spent("c1")

    assert len(calls) == 1


def test_ledger_settings_are_checked_when_it_is_built():
    client = fakeredis.FakeAsyncRedis()

    with pytest.raises(ValueError, match="default_budget 0"):
        PrivacyLedger(client, delta=DELTA, default_budget=0)
    with pytest.raises(ValueError, match="delta 1.5"):
        PrivacyLedger(client, delta=1.5, default_budget=1.0)
    with pytest.raises(ValueError, match="'nope'"):
        PrivacyLedger(client, delta=DELTA, default_budget=1.0, accountant="nope")


async def test_an_unreachable_redis_surfaces_as_a_ledger_error():
    client = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)
    ledger = PrivacyLedger(client, delta=DELTA, default_budget=1.0)

    with pytest.raises(LedgerUnavailableError, match="could not read ledger of client c1"):
        await ledger.spent("c1")
    await client.aclose()
