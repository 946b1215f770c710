"""The privacy budget over gRPC: over-budget clients are not selected and are refused."""

from __future__ import annotations

import grpc
import pytest

from coordinator.privacy import Charge, PrivacyLedger, epsilon
from coordinator.settings import CoordinatorSettings
from fedq.plan import TrainingPlan
from tests.support import start_stack, submit, update_for

CLIENTS = ["a", "b", "capped"]
PLAN = TrainingPlan(
    round=0, dp_mode="sample", noise_multiplier=1.0, clip_norm=1.0, batch_size=10, local_steps=20
)


def _epsilon_after(rounds: int) -> float:
    # Every client joins with 100 examples, so its sample rate is 10/100.
    charges = [Charge(r, "sample", 1.0, 0.1, 20) for r in range(1, rounds + 1)]
    return epsilon(charges, delta=1e-5)


async def _finish_round(stack, round_id: int, clients: list[str]) -> None:
    for c in clients:
        await submit(
            stack, c, update_for(stack.initial, seed=round_id), update_id=f"{c}-{round_id}"
        )
    await stack.manager.tick()  # open -> closing
    await stack.partials.commit(
        round_id,
        owner="test",
        total=_zeros(stack),
        examples=100 * len(clients),
        count=len(clients),
        update_ids=[f"{c}-{round_id}" for c in clients],
    )
    await stack.manager.tick()  # closing -> finalized
    await stack.manager.tick()  # open the next round


def _zeros(stack):
    import numpy as np

    return np.zeros(sum(a.size for a in stack.initial.values() if a.dtype.kind == "f"), np.int64)


@pytest.fixture
async def stack(redis, queue):
    settings = CoordinatorSettings(
        rounds=3,
        clients_per_round=3,
        round_timeout_s=60,
        evaluate=False,
        plan=PLAN,
        epsilon_budget=100.0,
    )
    ledger = PrivacyLedger(redis, delta=1e-5, default_budget=100.0)
    await ledger.set_budget("capped", (_epsilon_after(1) + _epsilon_after(2)) / 2)
    s = await start_stack(redis, queue, clients=CLIENTS, settings=settings)
    yield s
    await s.close()


async def test_a_client_at_its_budget_is_not_selected_while_others_continue(stack):
    assert (await stack.store.round(1)).participants == ["a", "b", "capped"]

    await _finish_round(stack, 1, CLIENTS)

    second = await stack.store.round(2)
    assert second.status == "open"
    assert second.participants == ["a", "b"]
    assert await stack.ledger.spent("capped") == pytest.approx(_epsilon_after(1), rel=1e-9)
    assert await stack.ledger.spent("a") == pytest.approx(_epsilon_after(2), rel=1e-9)


async def test_the_gateway_refuses_an_over_budget_client_stating_epsilon(stack):
    await _finish_round(stack, 1, CLIENTS)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(
            stack, "capped", update_for(stack.initial, seed=9), update_id="capped-2", round_id=2
        )

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "privacy budget exhausted" in caught.value.details()
    assert f"{_epsilon_after(1):.3f}" in caught.value.details()


async def test_the_ledger_survives_a_coordinator_restart(stack, redis):
    await _finish_round(stack, 1, CLIENTS)
    before = {c: await stack.ledger.spent(c) for c in CLIENTS}

    restarted = PrivacyLedger(redis, delta=1e-5, default_budget=100.0)

    assert {c: await restarted.spent(c) for c in CLIENTS} == before
    assert await restarted.budget("capped") == await stack.ledger.budget("capped")
