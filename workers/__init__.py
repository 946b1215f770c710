"""Stateless aggregator workers: queue consumers that fold updates into partial sums."""

from workers.consumer import AggregationWorker
from workers.settings import WorkerSettings

__all__ = ["AggregationWorker", "WorkerSettings"]
