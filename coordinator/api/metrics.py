"""Gauges the REST API refreshes before each scrape, on top of ``fedq.metrics``."""

from __future__ import annotations

import logging

from prometheus_client import Gauge

from coordinator.privacy import PrivacyLedger
from fedq.metrics import QUEUE_BACKLOG_PER_WORKER, QUEUE_DEPTH
from fedq.queue import QueueStats

__all__ = ["EPSILON_BUDGET", "EPSILON_SPENT", "record_privacy", "record_queue"]

log = logging.getLogger(__name__)

EPSILON_SPENT = Gauge("fedq_epsilon_spent", "Privacy loss ε spent per client", ["client_id"])
EPSILON_BUDGET = Gauge("fedq_epsilon_budget", "Privacy budget ε per client", ["client_id"])


def record_queue(stats: QueueStats) -> float:
    """Set the queue gauges from ``stats``; returns the backlog per consuming worker."""
    backlog = stats.ready / max(stats.consumers, 1)
    QUEUE_DEPTH.set(stats.ready)
    QUEUE_BACKLOG_PER_WORKER.set(backlog)
    return backlog


async def record_privacy(ledger: PrivacyLedger) -> int:
    """Set ε spent and budget for every client on the ledger; returns how many."""
    rows = await ledger.report()

    # Rebuild the label sets so clients gone after a federation reset disappear; there is
    # no await between clearing and setting, so no scrape sees the gauges half-filled.
    EPSILON_SPENT.clear()
    EPSILON_BUDGET.clear()
    for row in rows:
        EPSILON_SPENT.labels(client_id=row["client_id"]).set(row["epsilon_spent"])
        EPSILON_BUDGET.labels(client_id=row["client_id"]).set(row["epsilon_budget"])
    return len(rows)
