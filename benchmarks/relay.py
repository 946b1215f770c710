"""The cheapest possible gateway, as a ceiling: gRPC in, confirmed publish out, nothing else.

    python -m benchmarks.relay --port 50070 --queue fedq.bench.relay   # the relay alone

The relay serves ``SubmitUpdate`` of the wire contract and does only what any
gateway of this architecture must: receive the chunked upload over gRPC (same
server options as the gateway), publish the payload as one persistent message to a
durable quorum queue, wait for the broker's confirm, and reply. No token, round,
checksum or tensor checks, no Redis. ``relay_rate`` runs it in its own process,
drives it with the load generator's clients and acks every message from a consumer
in the benchmark's process, as the raw broker ceiling does. The rate it measures is
what the architecture itself allows on the machine: fedq's gateway and workers can
come close to it but not above it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import aio_pika
import grpc

from benchmarks.broker import AckingConsumer, fresh_quorum_queue
from benchmarks.load import submit, upload_chunks
from benchmarks.stack import AMQP_URL, REPO_ROOT, cpu_seconds, ensure_vhost, free_port
from coordinator.gateway.server import GRPC_OPTIONS
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc

__all__ = ["relay_rate"]

RELAY_QUEUE = "fedq.bench.relay"


class _Relay(pb_grpc.FederationServicer):
    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
        self._exchange = channel.default_exchange
        self._queue = queue

    async def SubmitUpdate(self, request_iterator, context):  # noqa: N802 - gRPC's name
        update_id, parts = "", []
        async for chunk in request_iterator:
            part = chunk.WhichOneof("part")
            if part == "header":
                update_id = chunk.header.update_id
            elif part == "data":
                parts.append(chunk.data)
        await self._exchange.publish(
            aio_pika.Message(
                b"".join(parts),
                message_id=update_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self._queue,
            mandatory=True,
        )
        return pb.SubmitReply(outcome=pb.SubmitReply.ACCEPTED, update_id=update_id)


async def _serve(port: int, queue: str, amqp_url: str) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_FederationServicer_to_server(_Relay(channel, queue), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def relay_rate(
    payloads: list[bytes],
    *,
    amqp_url: str = AMQP_URL,
    port: int | None = None,
    channels: int = 100,
    timeout_s: float = 600,
) -> tuple[float, float]:
    """Updates/s from the first submit to the last consumer ack through the relay, and
    the relay process's CPU-milliseconds per update. ``port``: a free one by default."""
    port = port or free_port()
    ensure_vhost(amqp_url)
    connection = await aio_pika.connect_robust(amqp_url)
    relay, open_channels = None, []
    try:
        queue = await fresh_quorum_queue(await connection.channel(), RELAY_QUEUE)
        relay = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.relay", "--port", str(port), "--amqp-url", amqp_url],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        if relay.stdout is None or relay.stdout.readline().strip() != b"ready":
            raise RuntimeError("the relay did not start")

        consumer = AckingConsumer(len(payloads))
        await consumer.start(connection, RELAY_QUEUE, prefetch=16)

        open_channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            for _ in range(min(channels, len(payloads)))
        ]
        start = asyncio.Event()
        requests = [upload_chunks(f"r{i:05d}", "", p, "q8") for i, p in enumerate(payloads)]
        tasks = [
            asyncio.create_task(
                submit(pb_grpc.FederationStub(open_channels[i % len(open_channels)]), r, start)
            )
            for i, r in enumerate(requests)
        ]
        cpu_before = cpu_seconds(relay.pid)
        started = time.perf_counter()
        start.set()
        outcomes = await asyncio.gather(*tasks)
        refused = [outcome for outcome, _ in outcomes if outcome != "ACCEPTED"]
        if refused:  # their messages will never come: no use waiting for them
            raise RuntimeError(f"the relay refused {len(refused)} uploads: {refused[0]}")
        await consumer.wait(timeout_s=timeout_s)
        elapsed = time.perf_counter() - started
        cpu_ms = 1000 * (cpu_seconds(relay.pid) - cpu_before) / len(payloads)
        await consumer.close()
        await queue.delete(if_unused=False, if_empty=False)
        return len(payloads) / elapsed, cpu_ms
    finally:
        for open_channel in open_channels:
            await open_channel.close()
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=30)
        await connection.close()


def main() -> None:
    """Serve the relay until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=50070)
    parser.add_argument("--queue", default=RELAY_QUEUE)
    parser.add_argument("--amqp-url", default=AMQP_URL)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.queue, args.amqp_url))


if __name__ == "__main__":
    main()
