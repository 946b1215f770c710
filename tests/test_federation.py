"""Whole federations: real clients training MNIST through the real RabbitMQ and Redis."""

from __future__ import annotations

import io

from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.federation import FederationOptions, run_federation
from fedq.plan import TrainingPlan


async def test_ten_clients_reach_90_percent_on_mnist_in_three_rounds(
    redis, queue, data_root, redis_url, amqp_url
):
    settings = CoordinatorSettings(
        dataset="mnist",
        data_dir=str(data_root),
        rounds=3,
        clients_per_round=10,
        round_timeout_s=300,
        plan=TrainingPlan(
            round=0, dp_mode="none", batch_size=64, local_steps=50, learning_rate=0.5
        ),
    )
    progress = io.StringIO()

    summary = await run_federation(
        settings,
        ServiceUrls(amqp_url=amqp_url, redis_url=redis_url),
        FederationOptions(clients=10, workers=2, progress=progress),
    )

    assert [r["status"] for r in summary.rounds] == ["finalized"] * 3
    assert all(r["updates_aggregated"] == 10 for r in summary.rounds)
    assert summary.final_accuracy > 0.90
    assert all(o.outcome == "accepted" for outs in summary.outcomes.values() for o in outs)
    assert "round   3" in progress.getvalue()
