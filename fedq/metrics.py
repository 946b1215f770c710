"""Prometheus metrics of every service (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AGGREGATION_SECONDS",
    "DEAD_LETTERS",
    "QUEUE_BACKLOG_PER_WORKER",
    "QUEUE_DEPTH",
    "ROUND_SECONDS",
    "TEST_ACCURACY",
    "TEST_LOSS",
    "UPDATES_ACCEPTED",
    "UPDATES_AGGREGATED",
    "UPDATES_RECEIVED",
    "UPDATES_REJECTED",
]

UPDATES_RECEIVED = Counter("fedq_updates_received_total", "Uploads whose header was read")
UPDATES_ACCEPTED = Counter("fedq_updates_accepted_total", "Updates queued and acknowledged")
UPDATES_REJECTED = Counter(
    "fedq_updates_rejected_total", "Uploads refused by the gateway", ["reason"]
)
UPDATES_AGGREGATED = Counter(
    "fedq_updates_aggregated_total", "Updates committed into partial sums by this worker"
)
DEAD_LETTERS = Counter(
    "fedq_dead_letters_total", "Updates moved to the dead-letter queue", ["reason"]
)
AGGREGATION_SECONDS = Histogram(
    "fedq_aggregation_seconds", "Seconds from a batch's first update to its commit"
)
ROUND_SECONDS = Histogram(
    "fedq_round_seconds",
    "Seconds from a round's opening to its model",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
QUEUE_DEPTH = Gauge("fedq_queue_depth", "Updates ready in the queue")
QUEUE_BACKLOG_PER_WORKER = Gauge(
    "fedq_queue_backlog_per_worker", "Updates ready per consuming worker"
)
TEST_ACCURACY = Gauge("fedq_test_accuracy", "Test accuracy of the latest global model")
TEST_LOSS = Gauge("fedq_test_loss", "Test loss of the latest global model")


def serve_metrics(port: int, *, host: str = "0.0.0.0") -> None:
    """Expose ``/metrics`` on ``port`` from a background thread (0 disables it)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
