"""The throughput benchmark's relay ceiling: every upload relayed, published and consumed."""

from __future__ import annotations

from benchmarks.relay import relay_rate


async def test_the_relay_publishes_every_upload_and_reports_its_rate_and_cpu(amqp_url):
    payloads = [bytes([i]) * 300_000 for i in range(12)]

    rate, cpu_ms = await relay_rate(payloads, amqp_url=amqp_url, channels=3, timeout_s=60)

    # relay_rate returns only once the consumer acked one message per upload.
    assert rate > 0
    assert cpu_ms > 0
