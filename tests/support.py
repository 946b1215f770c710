"""Building blocks for tests: a federation with an open round behind a real gateway."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np

from coordinator.gateway import GatewayServer
from coordinator.privacy import PrivacyLedger
from coordinator.rounds import RoundManager
from coordinator.settings import CoordinatorSettings, GatewaySettings
from fedq.plan import TrainingPlan
from fedq.state import PartialSumStore, RoundStore
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from proto.codec import encode_tensors


@dataclass
class Stack:
    """A gateway on a free port over a store with one open round."""

    store: RoundStore
    partials: PartialSumStore
    manager: RoundManager
    gateway: GatewayServer
    ledger: PrivacyLedger
    channel: grpc.aio.Channel
    stub: pb_grpc.FederationStub
    initial: dict[str, np.ndarray]
    tokens: dict[str, str] = field(default_factory=dict)

    async def close(self) -> None:
        """Stop the gateway and close the channel."""
        await self.channel.close()
        await self.gateway.stop(grace_s=0.5)


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny two-tensor model for gateway and worker tests."""
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "layer.bias": np.zeros(8, dtype=np.float32),
        "steps": np.zeros((), dtype=np.int64),
    }


async def start_stack(
    redis: Any,
    queue: Any,
    *,
    clients: list[str],
    initial: dict[str, np.ndarray] | None = None,
    settings: CoordinatorSettings | None = None,
    gateway_settings: GatewaySettings | None = None,
    examples: int = 100,
) -> Stack:
    """Create the federation, join ``clients`` over gRPC and open round 1."""
    initial = initial if initial is not None else small_model()
    settings = settings or CoordinatorSettings(
        rounds=3,
        clients_per_round=len(clients),
        round_timeout_s=60,
        evaluate=False,
        plan=TrainingPlan(round=0, dp_mode="none", codec="blosc2"),
    )
    store, partials = RoundStore(redis), PartialSumStore(redis)
    ledger = PrivacyLedger(redis, delta=settings.delta, default_budget=settings.epsilon_budget)
    manager = RoundManager(store=store, partials=partials, settings=settings, ledger=ledger)
    await manager.ensure_federation(model_name="test-model", initial=initial)

    gateway = GatewayServer(
        store=store,
        queue=queue,
        ledger=ledger,
        settings=replace(gateway_settings or GatewaySettings(), host="127.0.0.1", port=0),
    )
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stack = Stack(
        store, partials, manager, gateway, ledger, channel, pb_grpc.FederationStub(channel), initial
    )

    for client_id in clients:
        reply = await stack.stub.Join(pb.JoinRequest(client_id=client_id, num_examples=examples))
        stack.tokens[client_id] = reply.token
    await manager.tick()
    return stack


def update_for(
    initial: dict[str, np.ndarray], *, seed: int, scale: float = 0.01
) -> dict[str, np.ndarray]:
    """A random update with the model's float tensors."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(a.shape) * scale).astype(a.dtype)
        for name, a in initial.items()
        if a.dtype.kind == "f"
    }


def upload_chunks(
    *,
    client_id: str,
    token: str,
    round_id: int,
    update_id: str,
    payload: bytes,
    num_examples: int = 100,
    codec: str = "blosc2",
    checksum: str | None = None,
    declared_size: int | None = None,
    chunk_bytes: int = 1 << 20,
    drop_tail: int = 0,
    trailer: bool = True,
) -> list[pb.UpdateChunk]:
    """The messages of one upload, with knobs to break it."""
    header = pb.UpdateHeader(
        client_id=client_id,
        token=token,
        round=round_id,
        update_id=update_id,
        num_examples=num_examples,
        codec=codec,
        total_size=len(payload) if declared_size is None else declared_size,
    )
    body = payload[: len(payload) - drop_tail] if drop_tail else payload
    parts = [pb.UpdateChunk(header=header)]
    parts += [
        pb.UpdateChunk(data=body[i : i + chunk_bytes]) for i in range(0, len(body), chunk_bytes)
    ]
    if trailer:
        digest = checksum or hashlib.sha256(payload).hexdigest()
        parts.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest)))
    return parts


async def as_stream(items: list[Any]) -> AsyncIterator[Any]:
    """An async iterator over a list (a client stream)."""
    for item in items:
        yield item


async def submit(
    stack: Stack,
    client_id: str,
    update: dict[str, np.ndarray],
    *,
    update_id: str,
    round_id: int = 1,
    num_examples: int = 100,
) -> pb.SubmitReply:
    """Encode and upload one update through the gateway."""
    chunks = upload_chunks(
        client_id=client_id,
        token=stack.tokens[client_id],
        round_id=round_id,
        update_id=update_id,
        payload=encode_tensors(update),
        num_examples=num_examples,
    )
    return await stack.stub.SubmitUpdate(as_stream(chunks))


def start_worker_process(redis_url: str, amqp_url: str, **env: str) -> subprocess.Popen[bytes]:
    """A ``fedq worker`` process on the given services; ``env`` adds FEDQ_* settings."""
    from tests.conftest import REPO_ROOT

    environ = {
        **os.environ,
        "FEDQ_REDIS_URL": redis_url,
        "FEDQ_AMQP_URL": amqp_url,
        "FEDQ_WORKER_FLUSH_S": "0.05",
        "FEDQ_METRICS_PORT": "0",
        "PYTHONPATH": str(REPO_ROOT),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fedq.cli", "worker"],
        env=environ,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
