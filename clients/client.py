"""The federated client: join, follow rounds, fetch the model, train, submit the update."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from clients.capabilities import UploadMeter
from clients.connection import TRANSIENT_CODES, GatewayLink
from clients.simulation import SimulatedConditions
from fedq.plan import TrainingPlan
from proto import fedq_v1_pb2 as pb
from proto.codec import decode_tensors, encode_tensors

__all__ = ["ClientError", "FederatedClient", "RoundOutcome"]

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 1 << 20
MAX_MODEL_BYTES = 4 << 30

Trainer = Callable[[str, dict[str, np.ndarray], TrainingPlan], Any]


class ClientError(RuntimeError):
    """The gateway refused this client for a reason retries cannot fix."""


@dataclass
class RoundOutcome:
    """What happened to this client in one round."""

    round: int
    outcome: str  # accepted | duplicate | refused
    loss: float = float("nan")
    train_seconds: float = 0.0
    upload_bytes: int = 0
    message: str = ""


@dataclass
class FederatedClient:
    """One organisation's client; ``trainer(model_name, global_arrays, plan)`` trains locally."""

    client_id: str
    link: GatewayLink
    num_examples: int
    trainer: Trainer
    executor: Executor | None = None
    capabilities: pb.Capabilities = field(default_factory=pb.Capabilities)
    token: str = ""
    model_name: str = ""
    outcomes: list[RoundOutcome] = field(default_factory=list)
    # ``probe(model_name)`` measures this client's capabilities once the model is known.
    probe: Callable[[str], pb.Capabilities] | None = None
    upload: UploadMeter = field(default_factory=UploadMeter)
    conditions: SimulatedConditions | None = None
    # Asynchronous mode: train on the latest version again as soon as an update is sent.
    continuous: bool = False

    async def run(self) -> list[RoundOutcome]:
        """Take part in rounds until the federation finishes."""
        # Probe before the first join when the model is known in advance, so that even the
        # first round's plan is fitted; otherwise (or if the model differs) probe after it.
        probed = await self._probe() if self.model_name else ""
        await self.join()
        if self.model_name != probed and await self._probe():
            await self.join()
        if self.continuous:
            return await self._run_continuously()
        async for event in self.watch():
            if event.kind == pb.RoundEvent.FINISHED:
                break
            if event.kind == pb.RoundEvent.OPENED and event.selected:
                plan = TrainingPlan.from_dict(_plan_dict(event.plan))
                self.outcomes.append(await self.participate(plan, digest=event.model_digest))
        return self.outcomes

    async def _probe(self) -> str:
        """Measure the capabilities on the federation's model; returns the model probed."""
        if self.probe is None or not self.model_name:
            return ""
        loop = asyncio.get_running_loop()
        self.capabilities = await loop.run_in_executor(self.executor, self.probe, self.model_name)
        log.info(
            "client %s: %.0f samples/s, %.1f GiB available",
            self.client_id,
            self.capabilities.samples_per_second,
            self.capabilities.memory_bytes / 2**30,
        )
        return self.model_name

    async def _run_continuously(self) -> list[RoundOutcome]:
        """Asynchronous mode: always train on the newest version handed to this client."""
        latest: list[tuple[TrainingPlan, str]] = []
        ready = asyncio.Event()

        async def follow() -> None:
            async for event in self.watch():
                if event.kind == pb.RoundEvent.FINISHED:
                    break
                if event.kind == pb.RoundEvent.OPENED and event.selected:
                    plan = TrainingPlan.from_dict(_plan_dict(event.plan))
                    latest[:] = [(plan, event.model_digest)]
                    ready.set()
            ready.set()

        follower = asyncio.create_task(follow(), name=f"{self.client_id}-follow")
        trained = 0
        try:
            while True:
                await ready.wait()
                ready.clear()
                if follower.done():
                    follower.result()  # surfaces the stream's failure, if any
                    break
                plan, digest = latest[0]
                if plan.round <= trained:
                    continue
                trained = plan.round
                self.outcomes.append(await self.participate(plan, digest=digest))
                ready.set()  # a newer version may have opened while this one trained
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        return self.outcomes

    async def join(self) -> pb.JoinReply:
        """Register with the federation and keep the token."""
        if self.upload.bytes_per_second:
            self.capabilities.upload_bytes_per_second = self.upload.bytes_per_second
        request = pb.JoinRequest(
            client_id=self.client_id,
            num_examples=self.num_examples,
            capabilities=self.capabilities,
            protocol="fedq.v1",
        )
        reply = await self.link.call(
            "Join", lambda stub: stub.Join(request, timeout=self.link.timeout_s)
        )
        self.token, self.model_name = reply.token, reply.model_name
        log.info("client %s joined; current round %d", self.client_id, reply.current_round)
        return reply

    async def watch(self) -> AsyncIterator[pb.RoundEvent]:
        """Round events, reconnecting (from the last round seen) when the stream breaks."""
        after = 0
        failures = 0
        while True:
            request = pb.WatchRequest(client_id=self.client_id, token=self.token, after_round=after)
            try:
                async for event in self.link.stub.WatchRounds(request):
                    failures = 0
                    if event.kind == pb.RoundEvent.CLOSED:
                        after = max(after, event.round)
                    yield event
                    if event.kind == pb.RoundEvent.OPENED:
                        after = max(after, event.round)
                    if event.kind == pb.RoundEvent.FINISHED:
                        return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The stream's channel was closed under it (a failover): reconnect.
                failures += 1
                log.warning("client %s: round stream closed; reconnecting", self.client_id)
                await asyncio.sleep(min(10.0, 0.2 * 2 ** min(failures, 6)))
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    await self.join()
                elif exc.code() not in TRANSIENT_CODES:
                    raise
                failures += 1
                log.warning(
                    "client %s: round stream broke (%s); reconnecting",
                    self.client_id,
                    exc.code().name,
                )
                await self.link.fail_over()
                await asyncio.sleep(min(10.0, 0.2 * 2 ** min(failures, 6)))

    async def participate(self, plan: TrainingPlan, *, digest: str = "") -> RoundOutcome:
        """Fetch the round's model, train on it under the plan and submit the update."""
        await self._link_delay()
        blob = await self.fetch_model(plan.round, expected_digest=digest)
        arrays = decode_tensors(blob, max_bytes=MAX_MODEL_BYTES)

        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self.executor, self.trainer, self.model_name, arrays, plan
        )
        if self.conditions is not None:
            await asyncio.sleep(self.conditions.extra_training_s(result.seconds))
        payload = encode_tensors(result.delta, codec=plan.codec)

        update_id = f"{self.client_id}:{plan.round}:{uuid.uuid4().hex[:12]}"
        try:
            await self._link_delay()
            started = time.monotonic()
            reply = await self.submit(
                plan.round,
                update_id=update_id,
                payload=payload,
                num_examples=result.num_examples,
                codec=plan.codec,
                metrics={"steps": float(getattr(result, "steps", 0) or 0)},
            )
            self.upload.record(len(payload), time.monotonic() - started)
        except ClientError as exc:
            log.warning("client %s: round %d update refused: %s", self.client_id, plan.round, exc)
            return RoundOutcome(
                plan.round, "refused", result.loss, result.seconds, len(payload), str(exc)
            )
        outcome = "accepted" if reply.outcome == pb.SubmitReply.ACCEPTED else "duplicate"
        return RoundOutcome(plan.round, outcome, result.loss, result.seconds, len(payload))

    async def _link_delay(self) -> None:
        if self.conditions is not None and self.conditions.link_delay_s > 0:
            await asyncio.sleep(self.conditions.link_delay_s)

    async def fetch_model(self, round_id: int, *, expected_digest: str = "") -> bytes:
        """Download a round's model, resuming from the last byte received after a break."""
        buffer = bytearray()
        digest = expected_digest

        async def attempt(stub: Any) -> None:
            nonlocal digest
            request = pb.FetchModelRequest(
                client_id=self.client_id, token=self.token, round=round_id, offset=len(buffer)
            )
            async for chunk in stub.FetchModel(request, timeout=self.link.timeout_s):
                if chunk.offset != len(buffer):
                    raise ClientError(
                        f"model chunk at offset {chunk.offset}, expected {len(buffer)}"
                    )
                digest = digest or chunk.digest
                buffer.extend(chunk.data)

        await self._refusing(lambda: self.link.call(f"FetchModel r{round_id}", attempt))
        if digest and hashlib.sha256(buffer).hexdigest() != digest:
            raise ClientError(f"round {round_id} model digest mismatch after download")
        return bytes(buffer)

    async def submit(
        self,
        round_id: int,
        *,
        update_id: str,
        payload: bytes,
        num_examples: int,
        codec: str = "blosc2",
        metrics: dict[str, float] | None = None,
    ) -> pb.SubmitReply:
        """Upload an update; retries reuse ``update_id`` so it is counted once."""
        checksum = hashlib.sha256(payload).hexdigest()

        def chunks() -> list[pb.UpdateChunk]:
            header = pb.UpdateHeader(
                client_id=self.client_id,
                token=self.token,
                round=round_id,
                update_id=update_id,
                num_examples=num_examples,
                codec=codec,
                total_size=len(payload),
                metrics=metrics or {},
            )
            parts = [pb.UpdateChunk(header=header)]
            for start in range(0, len(payload), UPLOAD_CHUNK_BYTES):
                parts.append(pb.UpdateChunk(data=payload[start : start + UPLOAD_CHUNK_BYTES]))
            parts.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=checksum)))
            return parts

        async def attempt(stub: Any) -> pb.SubmitReply:
            return await stub.SubmitUpdate(_aiter(chunks()), timeout=self.link.timeout_s)

        reply = await self._refusing(lambda: self.link.call(f"SubmitUpdate r{round_id}", attempt))
        log.info(
            "client %s: round %d update %s %s",
            self.client_id,
            round_id,
            update_id,
            pb.SubmitReply.Outcome.Name(reply.outcome).lower(),
        )
        return reply

    async def _refusing(self, call: Callable[[], Any]) -> Any:
        """Run a call; a token expired by a re-join is renewed once, refusals become ClientError."""
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                await self.join()
                try:
                    return await call()
                except grpc.aio.AioRpcError as again:
                    exc = again
            raise ClientError(f"{exc.code().name}: {exc.details()}") from exc


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _plan_dict(plan: pb.TrainingPlan) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in plan.DESCRIPTOR.fields}
