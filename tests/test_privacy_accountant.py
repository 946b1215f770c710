"""ε accounting: agrees with Opacus driven step by step, and behaves like a privacy cost."""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from coordinator.privacy import Charge, epsilon, tradeoff_table
from fedq.plan import TrainingPlan

DELTA = 1e-5


def _mixed_charges() -> list[Charge]:
    plans = [
        TrainingPlan(round=0, noise_multiplier=1.0, sample_rate=0.01, local_steps=50),
        TrainingPlan(round=1, noise_multiplier=1.0, sample_rate=0.01, local_steps=50),
        TrainingPlan(round=2, dp_mode="client", noise_multiplier=4.0),
        TrainingPlan(round=3, noise_multiplier=1.5, sample_rate=0.02, local_steps=20),
        TrainingPlan(round=4, noise_multiplier=1.0, sample_rate=0.01, local_steps=50),
    ]
    return [Charge.from_plan(p) for p in plans]


def _drive(accountant, charges: list[Charge]) -> None:
    for charge in charges:
        for _ in range(charge.steps):
            accountant.step(
                noise_multiplier=charge.noise_multiplier, sample_rate=charge.sample_rate
            )


def test_sample_plan_charges_every_local_step_at_its_sample_rate():
    plan = TrainingPlan(round=7, noise_multiplier=1.2, sample_rate=0.02, local_steps=30)

    charge = Charge.from_plan(plan)

    assert charge == Charge(7, "sample", 1.2, 0.02, 30)


def test_client_plan_charges_one_unsampled_release_per_round():
    plan = TrainingPlan(round=3, dp_mode="client", noise_multiplier=2.0, local_steps=30)

    charge = Charge.from_plan(plan)

    assert charge == Charge(3, "client", 2.0, 1.0, 1)


def test_rdp_epsilon_equals_opacus_driven_step_by_step_for_a_mixed_history():
    charges = _mixed_charges()
    direct = RDPAccountant()
    _drive(direct, charges)

    eps = epsilon(charges, delta=DELTA, accountant="rdp")

    assert eps == pytest.approx(direct.get_epsilon(delta=DELTA), rel=1e-9)


def test_prv_epsilon_agrees_with_opacus_driven_step_by_step_and_is_tighter_than_rdp():
    charges = _mixed_charges()
    direct = PRVAccountant()
    _drive(direct, charges)
    with np.errstate(divide="ignore"):
        expected = direct.get_epsilon(delta=DELTA)

    eps = epsilon(charges, delta=DELTA, accountant="prv")

    # Merging equal mechanisms changes PRV's discretisation grid, not the bound beyond its
    # own 0.01 error allowance.
    assert eps == pytest.approx(expected, abs=0.05)
    assert eps < epsilon(charges, delta=DELTA, accountant="rdp")


def test_gdp_accepts_a_constant_mechanism_and_refuses_a_mixed_one():
    constant = [Charge(r, "sample", 1.0, 0.01, 50) for r in range(3)]

    assert epsilon(constant, delta=DELTA, accountant="gdp") > 0
    with pytest.raises(ValueError, match="use 'rdp' or 'prv'"):
        epsilon(_mixed_charges(), delta=DELTA, accountant="gdp")


def test_no_charges_cost_nothing_and_a_round_without_dp_costs_everything():
    without_dp = Charge.from_plan(TrainingPlan(round=1, dp_mode="none"))

    assert epsilon([], delta=DELTA) == 0.0
    assert epsilon([*_mixed_charges(), without_dp], delta=DELTA) == math.inf


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_noise_too_small_for_the_arithmetic_costs_everything_instead_of_failing(accountant):
    charges = [Charge(0, "sample", 6e-246, 0.1, 6)]

    assert epsilon(charges, delta=DELTA, accountant=accountant) == math.inf
    assert (
        tradeoff_table([6e-246], sample_rate=0.1, local_steps=2, rounds=3, delta=DELTA)[0][
            "epsilon"
        ]
        == math.inf
    )


def test_a_tradeoff_after_no_rounds_spends_nothing_at_every_noise_level():
    table = tradeoff_table([0.5, 2.0], sample_rate=0.1, local_steps=2, rounds=0, delta=DELTA)

    assert [row["epsilon"] for row in table] == [0.0, 0.0]


def test_unknown_accountant_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="'moments'.*gdp, prv, rdp"):
        epsilon(_mixed_charges(), delta=DELTA, accountant="moments")


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_the_open_unit_interval_is_refused(delta):
    with pytest.raises(ValueError, match=f"delta {delta}"):
        epsilon(_mixed_charges(), delta=delta)


@settings(max_examples=12, deadline=None)
@given(
    noise=st.floats(min_value=0.5, max_value=5.0),
    sample_rate=st.floats(min_value=0.001, max_value=0.2),
    steps=st.integers(min_value=1, max_value=100),
    rounds=st.integers(min_value=1, max_value=20),
)
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(noise, sample_rate, steps, rounds):
    def eps(noise_multiplier: float, n_rounds: int) -> float:
        charges = [
            Charge(r, "sample", noise_multiplier, sample_rate, steps) for r in range(n_rounds)
        ]
        return epsilon(charges, delta=DELTA)

    base = eps(noise, rounds)

    assert 0 < base <= eps(noise, rounds + 1)
    assert eps(noise * 1.25, rounds) <= base


def test_tradeoff_table_matches_epsilon_of_the_same_rounds():
    noises = [0.6, 1.0, 2.0]

    table = tradeoff_table(noises, sample_rate=0.01, local_steps=50, rounds=10, delta=DELTA)

    for row, noise in zip(table, noises, strict=True):
        charges = [Charge(r, "sample", noise, 0.01, 50) for r in range(10)]
        assert row["noise_multiplier"] == noise
        assert row["epsilon"] == pytest.approx(epsilon(charges, delta=DELTA), rel=1e-9)
    assert table[0]["epsilon"] > table[1]["epsilon"] > table[2]["epsilon"]


def test_tradeoff_table_of_ten_noise_levels_takes_under_a_second():
    noises = [0.5 + 0.25 * i for i in range(10)]

    start = time.perf_counter()
    table = tradeoff_table(noises, sample_rate=0.01, local_steps=50, rounds=100, delta=DELTA)
    elapsed_s = time.perf_counter() - start

    assert len(table) == 10
    assert elapsed_s < 1.0
