"""Plans with one Poisson sample rate for every client: equal ε whatever the data size."""

from __future__ import annotations

import pytest

from coordinator.privacy.accountant import Charge, epsilon
from coordinator.rounds.selection import plan_for_client
from coordinator.settings import CoordinatorSettings
from fedq.config import EnvReader, SettingsError
from fedq.plan import TrainingPlan
from fedq.state.rounds import ClientRecord

BASE = TrainingPlan(round=0, dp_mode="sample", noise_multiplier=2.0, batch_size=100)


def _plans(**options) -> dict[int, TrainingPlan]:
    plans = {}
    for examples in (200, 2000):
        client = ClientRecord(f"c{examples}", examples, joined_at=0.0, last_seen=0.0)
        plans[examples] = plan_for_client(BASE, client, round_id=3, deadline=0.0, seed=0, **options)
    return plans


def _epsilon(plan: TrainingPlan) -> float:
    return epsilon([Charge.from_plan(plan)], delta=1e-5)


def test_by_default_a_small_client_samples_more_of_its_data_and_spends_more():
    plans = _plans()

    assert [p.batch_size for p in plans.values()] == [100, 100]
    assert plans[200].sample_rate == 0.5 and plans[2000].sample_rate == 0.05
    assert _epsilon(plans[200]) > 2 * _epsilon(plans[2000])


def test_a_fixed_sample_rate_scales_each_batch_and_charges_everyone_alike():
    plans = _plans(sample_rate=0.1)

    assert [p.batch_size for p in plans.values()] == [20, 200]
    assert {p.sample_rate for p in plans.values()} == {0.1}
    assert _epsilon(plans[200]) == _epsilon(plans[2000])


def test_a_sample_rate_outside_zero_to_one_is_refused():
    with pytest.raises(SettingsError, match="FEDQ_SAMPLE_RATE"):
        CoordinatorSettings.from_env(EnvReader({"FEDQ_SAMPLE_RATE": "1.5"}))
    with pytest.raises(SettingsError, match="FEDQ_SAMPLE_RATE"):
        CoordinatorSettings(sample_rate=-0.1)
