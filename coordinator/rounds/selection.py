"""Choosing a round's participants and writing their training plans."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from fedq.plan import TrainingPlan
from fedq.state.rounds import ClientRecord

__all__ = ["plan_for_client", "select_participants"]


def select_participants(
    candidates: Sequence[ClientRecord],
    *,
    count: int,
    round_id: int,
    seed: int,
    counts: Mapping[str, int] | None = None,
) -> list[ClientRecord]:
    """``count`` candidates (all of them if fewer), fair over rounds and seeded.

    Clients selected least often so far (``counts``, from the store) come first; ties
    are broken by a random order drawn from ``seed`` and ``round_id``, so the same
    state always gives the same choice and, over rounds, every client takes part
    about equally often.
    """
    ordered = sorted(candidates, key=lambda c: c.client_id)
    if len(ordered) <= count:
        return ordered
    rng = random.Random(f"{seed}:{round_id}")
    tiebreak = {c.client_id: rng.random() for c in ordered}
    seen = counts or {}
    ranked = sorted(ordered, key=lambda c: (seen.get(c.client_id, 0), tiebreak[c.client_id]))
    return sorted(ranked[:count], key=lambda c: c.client_id)


def plan_for_client(
    base: TrainingPlan,
    client: ClientRecord,
    *,
    round_id: int,
    deadline: float,
    seed: int,
    sample_rate: float = 0.0,
) -> TrainingPlan:
    """The base plan for one client.

    By default its sample rate gives the configured batch size, so a client with few
    examples samples a larger share of them per step and spends ε faster. With a fixed
    ``sample_rate`` every client samples the same share (its batch grows with its data)
    and the same plan costs every client the same ε.
    """
    examples = max(1, client.num_examples)
    if sample_rate > 0:
        batch_size = max(1, round(sample_rate * examples))
    else:
        batch_size = min(base.batch_size, examples)
        sample_rate = min(1.0, base.batch_size / examples)
    digest = hashlib.sha256(f"{seed}:{round_id}:{client.client_id}".encode()).digest()
    return base.with_round(
        round_id,
        sample_rate=sample_rate,
        batch_size=batch_size,
        deadline_unix=deadline,
        seed=int.from_bytes(digest[:4], "big"),
    )
