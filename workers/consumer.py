"""The worker loop: consume queued updates, fold them into partial sums, then ack.

Order of operations per batch: decode and check each update and add its fixed-point
form into the round's running sum in memory, commit the worker's new cumulative
partial sum and the batch's update ids in one atomic step, and only then ack the
batch's messages. A worker killed before the commit loses nothing (the broker
redelivers); one killed after it counts nothing twice (the ids are recorded with the
sum, and the commit of whoever gets the redelivery refuses them).

An update split into several messages (see ``fedq.state.parts``) is gathered in
Redis part by part; the worker whose part completes it decodes it and treats that
part's message as the update's delivery.

Memory. A round's running sum is one int64 vector that updates are added into in
place, a decoded slice at a time: an update is decoded, checked and added slice by
slice, so no tensor is ever decoded whole. A pending update is kept only as its
compressed payload, which is enough to take it back out exactly (integer
subtraction) when the commit refuses it. The in-memory sum is a cache of the
committed one in Redis plus the pending updates: whenever they may have drifted
apart (a commit whose outcome is unknown, an update that failed its checks halfway)
the sum is read back from Redis and the pending updates are added again. So a worker
holds one int64 model-sized vector, the pending payloads, one decoded slice (plus,
while a large compressed tensor is read, a copy of its compressed bytes) and one
piece of the sum being written, never a second model-sized vector.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import redis.asyncio as aioredis

from fedq import metrics
from fedq.queue import Delivery, UpdateQueue
from fedq.queue.message import MessageError, QueuedUpdate
from fedq.state import PartialSumStore, RoundStore
from fedq.state.partials import add_fixed_point
from fedq.state.parts import PartStash
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from proto.codec import SMALL_PAYLOAD_BYTES, CodecError, iter_slices
from workers.settings import WorkerSettings
from workers.weights import staleness_weight, work_weight

__all__ = ["AggregationWorker"]

log = logging.getLogger(__name__)

_RECONNECT_MAX_S = 10.0


@dataclass
class _Pending:
    update_id: str
    payload: bytes | bytearray  # kept to take the update back out of the sum
    examples: int
    delivery: Delivery
    digest: str = ""  # set for an update gathered from parts: its parts hash to discard


@dataclass
class _RoundBatch:
    """One round's running sum: the committed partial sum plus the pending updates.

    ``synced`` is False while ``total`` may differ from that sum; the batch is then
    rebuilt from Redis before it is used.
    """

    round: int
    total: np.ndarray
    committed_examples: int = 0
    committed_count: int = 0
    pending: list[_Pending] = field(default_factory=list)
    pending_bytes: int = 0
    first_at: float = 0.0
    synced: bool = False


class AggregationWorker:
    """One stateless consumer; run as many as the backlog needs."""

    def __init__(
        self,
        *,
        queue: UpdateQueue,
        redis: aioredis.Redis,
        settings: WorkerSettings,
        name: str | None = None,
    ) -> None:
        self._queue = queue
        self._rounds = RoundStore(redis)
        self._partials = PartialSumStore(redis)
        self._stash = PartStash(redis)
        self._settings = settings
        self.worker_id = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._spec: ModelSpec | None = None
        self._batches: dict[int, _RoundBatch] = {}
        self._lock = asyncio.Lock()
        self._last_delivery_at = 0.0
        self.committed_updates = 0
        self._planned: dict[tuple[int, str], int] = {}

    async def run(self) -> None:
        """Consume until cancelled; unsettled messages return to the queue."""
        log.info("worker %s joined", self.worker_id)
        flusher = asyncio.create_task(self._flush_on_time(), name=f"flush-{self.worker_id}")
        try:
            failures = 0
            while not await self._consume_until_failure():
                failures += 1
                await asyncio.sleep(min(_RECONNECT_MAX_S, 0.5 * 2 ** min(failures, 5)))
        finally:
            await cancel_and_wait(flusher)
            log.info(
                "worker %s left after committing %d updates", self.worker_id, self.committed_updates
            )

    async def _consume_until_failure(self) -> bool:
        """Consume; True when the queue closed, False after a broker or store failure.

        After a failure every uncommitted update is forgotten: closing the consumer
        hands its unacknowledged messages back to the queue, which delivers them again.
        """
        consumer = self._queue.consume(prefetch=self._settings.prefetch)
        try:
            async for delivery in consumer:
                await self._on_delivery(delivery)
                self._last_delivery_at = time.monotonic()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker or store outage: reconnect, redeliveries follow
            dropped = sum(len(b.pending) for b in self._batches.values())
            log.warning(
                "worker %s lost the broker or the store (%s); %d uncommitted updates "
                "go back to the queue",
                self.worker_id,
                exc,
                dropped,
            )
            log.debug("worker failure", exc_info=True)
            for batch in self._batches.values():
                if batch.pending:  # their updates are in the sum but go back to the queue
                    batch.synced = False
                batch.pending, batch.pending_bytes = [], 0
            return False
        finally:
            await _close_quietly(consumer)

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            update = QueuedUpdate.decode(delivery.body)
        except MessageError as exc:
            await self._dead_letter(delivery, f"undecodable message: {exc}")
            return
        if update.parts > 1:
            gathered = await self._gather(update, delivery)
            if gathered is None:
                return
            update = gathered
        update = await self._weighted(update)

        spec = await self._model_spec()
        async with self._lock:
            batch = await self._batch(update.round, spec)
            if any(p.update_id == update.update_id for p in batch.pending):
                # A second copy of an update already in this batch. A client's retry may
                # have encoded it anew (q8 rounds at random), so its parts can sit under
                # another digest than the copy that will be counted.
                if update.digest and all(p.digest != update.digest for p in batch.pending):
                    await self._stash.discard(update.round, update.update_id, digest=update.digest)
                await delivery.ack()
                return
            try:
                await self._apply(batch, update.payload, update.num_examples)
            except CodecError as exc:
                await self._dead_letter(
                    delivery, f"round {update.round}: update {update.update_id}: {exc}"
                )
                return

            if not batch.pending:
                batch.first_at = time.monotonic()
            batch.pending.append(
                _Pending(
                    update.update_id, update.payload, update.num_examples, delivery, update.digest
                )
            )
            batch.pending_bytes += len(update.payload)
            if (
                len(batch.pending) >= self._settings.batch_updates
                or batch.pending_bytes >= self._settings.batch_bytes
            ):
                await self._flush(batch)

    async def _gather(self, update: QueuedUpdate, delivery: Delivery) -> QueuedUpdate | None:
        """Store one part; the whole update once this part completes it, else ``None``."""
        if await self._partials.already_applied(update.round, [update.update_id]):
            await delivery.ack()  # a late copy of a part of an update already counted
            return None
        held = await self._stash.store(
            update.round,
            update.update_id,
            digest=update.digest,
            part=update.part,
            data=update.payload,
        )
        if held < update.parts:
            # A copy of a part stored while another worker committed the update may land
            # after that worker discarded the hash: checking again after the store sees
            # the commit, so no stray hash is left to wait for its expiry.
            if await self._partials.already_applied(update.round, [update.update_id]):
                await self._stash.discard(update.round, update.update_id, digest=update.digest)
            await delivery.ack()  # the part is safe in Redis; the completing one stays unacked
            return None

        payload = await self._stash.assemble(
            update.round, update.update_id, digest=update.digest, parts=update.parts
        )
        if payload is None:
            await self._dead_letter(
                delivery,
                f"round {update.round}: update {update.update_id}: parts do not match its digest",
            )
            return None
        log.debug("round %d: gathered %d parts of %s", update.round, update.parts, update.update_id)
        return replace(update, payload=payload, part=0, parts=1)

    async def _weighted(self, update: QueuedUpdate) -> QueuedUpdate:
        """The update with its integer weight (see ``workers.weights``) as its examples."""
        weight = update.num_examples
        base = update.base_version or update.round
        if update.steps > 0:
            planned = await self._planned_steps(base, update.client_id)
            weight = work_weight(weight, steps_done=update.steps, planned_steps=planned)
        weight = staleness_weight(weight, staleness=update.round - base)
        if weight == update.num_examples:
            return update
        log.debug("round %d: update %s weighs %d", update.round, update.update_id, weight)
        return replace(update, num_examples=weight)

    async def _planned_steps(self, round_id: int, client_id: str) -> int:
        key = (round_id, client_id)
        if key not in self._planned:
            plan = await self._rounds.plan_for(round_id, client_id)
            if len(self._planned) > 100_000:
                self._planned.clear()
            self._planned[key] = plan.local_steps if plan is not None else 0
        return self._planned[key]

    async def _apply(
        self,
        batch: _RoundBatch,
        payload: bytes | bytearray,
        examples: int,
        *,
        subtract: bool = False,
    ) -> None:
        """Add an update's fixed-point form into the batch's sum (or take it back out).

        Raises:
            CodecError: the payload does not fit the model. Tensors before the faulty
                one were already added, so the batch is marked for a rebuild.
        """
        spec = await self._model_spec()
        try:
            if len(payload) <= SMALL_PAYLOAD_BYTES:  # a thread hop would cost more
                self._add_update(batch.total, payload, examples, spec, subtract)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._add_update, batch.total, payload, examples, spec, subtract
                )
        except BaseException:
            batch.synced = False
            raise

    def _add_update(
        self,
        total: np.ndarray,
        payload: bytes | bytearray,
        examples: int,
        spec: ModelSpec,
        subtract: bool,
    ) -> None:
        offsets = spec.update_offsets
        seen = set()
        for name, offset, values in iter_slices(
            payload,
            max_bytes=spec.update_nbytes,
            expected=spec,
            max_abs_value=self._settings.max_abs_value,
        ):
            begin = offsets[name] + offset
            add_fixed_point(total[begin : begin + values.size], values, examples, subtract=subtract)
            seen.add(name)

        missing = sorted(offsets.keys() - seen)
        if missing:
            raise CodecError(f"update lacks tensors {missing[:5]} of the model")

    async def _resync(self, batch: _RoundBatch) -> None:
        """Rebuild the sum: the committed partial sum from Redis plus the pending updates."""
        committed = await self._partials.load(batch.round, owner=self.worker_id, out=batch.total)
        if committed is None:
            batch.total = np.zeros(batch.total.size, dtype=np.int64)
            committed = (0, 0)
        else:
            log.info("round %d: worker %s reloaded its partial sum", batch.round, self.worker_id)
        batch.committed_examples, batch.committed_count = committed

        for p in batch.pending:
            await self._apply(batch, p.payload, p.examples)
        batch.synced = True

    async def _flush_on_time(self) -> None:
        settings = self._settings
        while True:
            await asyncio.sleep(min(settings.flush_s / 2, settings.flush_idle_s))
            async with self._lock:
                now = time.monotonic()
                idle = now - self._last_delivery_at >= settings.flush_idle_s
                for batch in list(self._batches.values()):
                    if batch.pending and (idle or now - batch.first_at >= settings.flush_s):
                        try:
                            await self._flush(batch)
                        except Exception as exc:  # the store is down: keep the batch, retry
                            log.warning("round %d: commit failed (%s); retrying", batch.round, exc)

    async def _flush(self, batch: _RoundBatch) -> None:
        """Commit the batch's pending updates, then ack them (caller holds the lock)."""
        started = batch.first_at
        while batch.pending:
            if not batch.synced:
                await self._resync(batch)
            known = await self._partials.already_applied(
                batch.round, [p.update_id for p in batch.pending]
            )
            await self._settle_known(batch, known)
            if not batch.pending:
                break

            examples = batch.committed_examples + sum(p.examples for p in batch.pending)
            count = batch.committed_count + len(batch.pending)
            try:
                outcome = await self._partials.commit(
                    batch.round,
                    owner=self.worker_id,
                    total=batch.total,
                    examples=examples,
                    count=count,
                    update_ids=[p.update_id for p in batch.pending],
                )
            except BaseException:
                # Redis may or may not have taken the commit: rebuild before the next one.
                batch.synced = False
                raise

            if outcome.status == "duplicate":
                await self._settle_known(batch, set(outcome.duplicates))
                continue
            if outcome.status == "closed":
                await self._drop_late(batch, outcome.round_status)
                return

            done, batch.pending, batch.pending_bytes = batch.pending, [], 0
            batch.committed_examples, batch.committed_count = examples, count
            for p in done:
                await p.delivery.ack()
            await self._discard_parts(batch.round, done)
            self.committed_updates += len(done)
            metrics.UPDATES_AGGREGATED.inc(len(done))
            metrics.AGGREGATION_SECONDS.observe(time.monotonic() - started)
            log.debug(
                "round %d: worker %s committed %d updates", batch.round, self.worker_id, len(done)
            )

    async def _discard_parts(self, round_id: int, settled: list[_Pending]) -> None:
        # Best effort: a hash left behind by a crash here expires on its own.
        for p in settled:
            if p.digest:
                await self._stash.discard(round_id, p.update_id, digest=p.digest)

    async def _settle_known(self, batch: _RoundBatch, known: set[str]) -> None:
        """Take updates some partial sum already counts out of the sum, and ack them."""
        settled = [p for p in batch.pending if p.update_id in known]
        if not settled:
            return
        for p in settled:
            await self._apply(batch, p.payload, p.examples, subtract=True)
        batch.pending = [p for p in batch.pending if p.update_id not in known]
        batch.pending_bytes = sum(len(p.payload) for p in batch.pending)

        await self._discard_parts(batch.round, settled)
        for p in settled:
            log.info(
                "round %d: update %s already counted; acking the redelivery",
                batch.round,
                p.update_id,
            )
            await p.delivery.ack()

    async def _drop_late(self, batch: _RoundBatch, round_status: str) -> None:
        # The round stopped taking updates only after every acknowledged update was
        # counted, so these copies were never acknowledged to a client.
        for p in batch.pending:
            log.warning(
                "round %d is %s: dropping unacknowledged late update %s",
                batch.round,
                round_status,
                p.update_id,
            )
            await p.delivery.ack()
        self._batches.pop(batch.round, None)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        log.error("dead-lettering message %s: %s", delivery.message_id, reason)
        metrics.DEAD_LETTERS.labels(reason=reason.split(":")[0][:40]).inc()
        await self._queue.dead_letter(delivery, reason=reason)

    async def _batch(self, round_id: int, spec: ModelSpec) -> _RoundBatch:
        """The round's batch, rebuilt from Redis if needed (caller holds the lock)."""
        # Only one model-sized sum stays in memory: another round's idle batch is
        # dropped, and read back from Redis should an update of that round come.
        for old in [r for r, b in self._batches.items() if r != round_id and not b.pending]:
            del self._batches[old]
        batch = self._batches.get(round_id)
        if batch is None:
            batch = _RoundBatch(round_id, np.zeros(spec.update_size, dtype=np.int64))
            self._batches[round_id] = batch
        if not batch.synced:
            await self._resync(batch)
        return batch

    async def _model_spec(self) -> ModelSpec:
        while self._spec is None:
            federation = await self._rounds.federation()
            if federation is not None:
                self._spec = federation.spec
                break
            await asyncio.sleep(0.5)
        return self._spec


async def _close_quietly(consumer: object) -> None:
    try:
        await consumer.aclose()  # type: ignore[attr-defined]
    except Exception:  # the channel may already be gone with the connection
        log.debug("closing a consumer failed", exc_info=True)
