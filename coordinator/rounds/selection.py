"""Choosing a round's participants and writing their training plans."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from fedq.plan import TrainingPlan
from fedq.state.rounds import ClientRecord

__all__ = ["plan_for_client", "select_participants"]


def select_participants(
    candidates: Sequence[ClientRecord], *, count: int, round_id: int, seed: int
) -> list[ClientRecord]:
    """A seeded random sample of ``count`` candidates (all of them if fewer)."""
    ordered = sorted(candidates, key=lambda c: c.client_id)
    if len(ordered) <= count:
        return ordered
    rng = random.Random(f"{seed}:{round_id}")
    return sorted(rng.sample(ordered, count), key=lambda c: c.client_id)


def plan_for_client(
    base: TrainingPlan, client: ClientRecord, *, round_id: int, deadline: float, seed: int
) -> TrainingPlan:
    """The base plan for one client: its sample rate gives the configured batch size."""
    examples = max(1, client.num_examples)
    sample_rate = min(1.0, base.batch_size / examples)
    digest = hashlib.sha256(f"{seed}:{round_id}:{client.client_id}".encode()).digest()
    return base.with_round(
        round_id,
        sample_rate=sample_rate,
        batch_size=min(base.batch_size, examples),
        deadline_unix=deadline,
        seed=int.from_bytes(digest[:4], "big"),
    )
