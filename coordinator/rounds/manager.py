"""The round manager: opens rounds, closes them on target or deadline, finalizes FedAvg.

Every decision is taken from the state in the store and written back before it
takes effect, so a restarted (or standby) coordinator continues where the last one
stopped. Round life cycle::

    open --(target met, or deadline with quorum)--> closing --(all acknowledged
    updates counted)--> aggregating --(model r+1 stored)--> finalized
    open --(deadline, no quorum, no extension left)--> abandoned
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from coordinator.rounds.leader import LeaderLease
from coordinator.rounds.plans import PlanLimits, fit_plan
from coordinator.rounds.selection import plan_for_client, select_participants
from coordinator.rounds.server_optimizer import (
    ServerOptimizer,
    decode_velocity,
    encode_velocity,
)
from coordinator.settings import CoordinatorSettings
from fedq import metrics
from fedq.state import PartialSumStore, RoundRecord, RoundStore, StoreUnavailableError
from fedq.state.participation import SelectionCounts
from fedq.state.rounds import (
    ABANDONED,
    CLOSING,
    FINALIZED,
    OPEN,
    FederationRecord,
    FencedError,
)
from fedq.tasks import cancel_and_wait
from fedq.tensors import ModelSpec
from proto.codec import decode_tensors, encode_tensors

__all__ = ["AGGREGATING", "RoundManager"]

log = logging.getLogger(__name__)

AGGREGATING = "aggregating"
_DRAIN_LOG_EVERY_S = 30.0

Evaluator = Callable[[dict[str, np.ndarray]], tuple[float, float]]


class RoundManager:
    """Drives the federation's rounds from the shared store."""

    def __init__(
        self,
        *,
        store: RoundStore,
        partials: PartialSumStore,
        settings: CoordinatorSettings,
        ledger: Any,
        evaluator: Evaluator | None = None,
        lease: LeaderLease | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self._store = store
        self._partials = partials
        self._settings = settings
        self._ledger = ledger
        self._evaluator = evaluator
        self._lease = lease
        self._renewer: asyncio.Task[None] | None = None
        self._poll_s = poll_s
        self._evaluations: dict[int, asyncio.Task[None]] = {}
        self._selections = SelectionCounts(store.redis)
        self._last_wait_log = 0.0

    async def ensure_federation(
        self, *, model_name: str, initial: dict[str, np.ndarray]
    ) -> FederationRecord:
        """Create the federation with its initial model unless the store has one."""
        record = FederationRecord(
            model_name=model_name,
            dataset=self._settings.dataset,
            spec=ModelSpec.from_arrays(initial),
            total_rounds=self._settings.rounds,
            mode=self._settings.mode,
            max_staleness=self._settings.async_max_staleness,
            server_learning_rate=self._settings.server_learning_rate,
            server_momentum=self._settings.server_momentum,
        )
        created = await self._store.init_federation(record, initial_model=encode_tensors(initial))
        federation = await self._store.federation()
        assert federation is not None
        if created:
            log.info(
                "federation created: model %s, %d parameters, %d rounds",
                model_name,
                record.spec.update_size,
                record.total_rounds,
            )
        else:
            log.info(
                "federation found in the store at round %d (%s); continuing",
                federation.current_round,
                federation.status,
            )
        return federation

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Tick until the federation finishes (or ``stop`` is set)."""
        try:
            while stop is None or not stop.is_set():
                if await self._step():
                    break
                await asyncio.sleep(self._poll_s)
            await self.wait_evaluations()
        finally:
            if self._renewer is not None:
                await cancel_and_wait(self._renewer)
            if self._lease is not None:
                await self._lease.release()

    async def _step(self) -> bool:
        """Lead and tick once; an outage of the store is logged and retried."""
        try:
            return await self._lead() and await self._tick_fenced()
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, StoreUnavailableError) as exc:
            log.warning("round manager cannot reach the store (%s); retrying", exc)
            await asyncio.sleep(1.0)
            return False

    async def _lead(self) -> bool:
        """Hold the lease (when there is one) and fence the store's writes with it.

        The lease is renewed by a task of its own as well, so that a slow step (a
        model evaluation, ledger accounting on a busy machine) does not let it lapse.
        """
        if self._lease is None:
            return True
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_lease(), name="lease-renewer")
        self._store.fence = await self._lease.hold()
        return self._store.fence is not None

    async def _renew_lease(self) -> None:
        assert self._lease is not None
        while True:
            await asyncio.sleep(self._lease.ttl_s / 3)
            try:
                if self._store.fence is not None:
                    self._store.fence = await self._lease.hold()
            except (RedisError, OSError) as exc:
                log.warning("lease renewal failed (%s); retrying", exc)

    async def _tick_fenced(self) -> bool:
        try:
            return await self.tick()
        except FencedError as exc:
            log.warning("round step not taken: %s", exc)
            return False

    async def wait_evaluations(self) -> None:
        """Wait for running model evaluations."""
        if self._evaluations:
            await asyncio.gather(*self._evaluations.values(), return_exceptions=True)

    async def tick(self) -> bool:
        """Take the next due step; True once the federation has finished."""
        federation = await self._store.federation()
        if federation is None or federation.status == "finished":
            return federation is not None

        current = federation.current_round
        record = await self._store.round(current) if current else None
        if record is None or record.status in (FINALIZED, ABANDONED):
            if current >= federation.total_rounds:
                await self._store.set_progress(current_round=current, status="finished")
                log.info("federation finished after %d rounds", current)
                return True
            await self._try_open(current + 1, federation)
        elif record.status == OPEN:
            await self._maybe_close(record)
        elif record.status in (CLOSING, AGGREGATING):
            await self._maybe_finalize(record, federation)
        return False

    # -- opening ----------------------------------------------------------------------------

    async def _try_open(self, round_id: int, federation: FederationRecord) -> None:
        now = time.time()
        live = [
            c
            for c in await self._store.clients()
            if now - c.last_seen <= self._settings.client_timeout_s
        ]
        needed = self._settings.start_clients if round_id == 1 else 1
        if len(live) < needed:
            self._log_waiting(
                "round %d waits for clients: %d of %d joined", round_id, len(live), needed
            )
            return

        deadline = now + self._settings.round_timeout_s
        plans = {}
        excluded = {}
        for client in live:
            plan = plan_for_client(
                self._settings.plan,
                client,
                round_id=round_id,
                deadline=deadline,
                seed=self._settings.seed,
                sample_rate=self._settings.sample_rate,
            )
            plan = self._fit(plan, client, federation, budget_s=deadline - now)
            affordable, would_reach = await self._affordable(client.client_id, plan)
            if affordable:
                plans[client.client_id] = plan
            else:
                excluded[client.client_id] = await self._budget_reason(
                    client.client_id, would_reach
                )
                log.info(
                    "round %d: client %s not selected: %s",
                    round_id,
                    client.client_id,
                    excluded[client.client_id],
                )
        candidates = [c for c in live if c.client_id in plans]
        asynchronous = self._settings.mode == "async"
        chosen = select_participants(
            candidates,
            count=len(candidates) if asynchronous else self._settings.participants_for(len(live)),
            round_id=round_id,
            seed=self._settings.seed,
            counts=await self._selections.counts(c.client_id for c in candidates),
        )
        if not chosen:
            await self._store.set_progress(current_round=round_id - 1, status="finished")
            log.warning("federation finished early: no client can afford round %d", round_id)
            return

        chosen_plans = {c.client_id: plans[c.client_id] for c in chosen}
        if self._settings.plan.dp_mode != "none":
            for client_id, plan in chosen_plans.items():
                await self._ledger.charge(client_id, plan)
        await self._store.put_exclusions(round_id, excluded)
        await self._store.put_plans(round_id, chosen_plans)
        await self._selections.record(round_id, chosen_plans)
        # Asynchronous mode: a version closes after ``buffer_size`` accepted updates from
        # any of its participants, or at its deadline with at least one.
        target = self._settings.buffer_size if asynchronous else None
        await self._open(
            round_id,
            chosen_plans,
            deadline=deadline,
            opened_at=now,
            target=target,
            quorum=1 if asynchronous else None,
        )

    def _fit(self, plan: Any, client: Any, federation: FederationRecord, *, budget_s: float) -> Any:
        """The plan with the local steps that fit the round's deadline at the client's speed."""
        if not self._settings.adaptive_plans:
            return plan
        limits = PlanLimits(
            min_steps=self._settings.min_local_steps,
            max_steps=self._settings.max_steps,
            safety=self._settings.plan_safety,
        )
        fitted = fit_plan(
            plan,
            client.capabilities,
            num_examples=client.num_examples,
            budget_s=budget_s,
            limits=limits,
            update_bytes=federation.spec.update_nbytes,
        )
        if fitted.local_steps != plan.local_steps or fitted.batch_size != plan.batch_size:
            log.info(
                "round %d: client %s plan fitted to %.0f samples/s: %d steps of %d",
                plan.round,
                client.client_id,
                float(client.capabilities.get("samples_per_second") or 0.0),
                fitted.local_steps,
                fitted.batch_size,
            )
        return fitted

    async def _affordable(self, client_id: str, plan: Any) -> tuple[bool, float]:
        # NOTE: with DP off (dp_mode "none", for baselines) there is no guarantee to
        # account for; such federations are logged as non-private and not budgeted.
        if plan.dp_mode == "none":
            return True, math.inf
        affordable, would_reach = await self._ledger.can_afford(client_id, plan)
        return bool(affordable), float(would_reach)

    async def _budget_reason(self, client_id: str, would_reach: float) -> str:
        spent = await self._ledger.spent(client_id)
        budget = await self._ledger.budget(client_id)
        return (
            f"privacy budget exhausted: ε spent {spent:.3f} of {budget:.3f} allowed; "
            f"the next round would reach {would_reach:.3f}"
        )

    async def _open(
        self,
        round_id: int,
        plans: dict[str, Any],
        *,
        deadline: float,
        opened_at: float,
        target: int | None = None,
        quorum: int | None = None,
    ) -> None:
        target = target or len(plans)
        quorum = quorum or max(1, math.ceil(self._settings.quorum_fraction * target))
        digest = await self._store.model_digest(round_id) or ""
        await self._store.put_round(
            RoundRecord(
                round=round_id,
                status=OPEN,
                opened_at=opened_at,
                deadline=deadline,
                target=target,
                quorum=quorum,
                participants=sorted(plans),
                model_digest=digest,
            )
        )
        await self._store.set_progress(current_round=round_id, status="running")
        log.info(
            "round %d opened: %d participants, quorum %d, deadline in %.0fs",
            round_id,
            target,
            quorum,
            deadline - opened_at,
        )

    # -- closing ----------------------------------------------------------------------------

    async def _maybe_close(self, record: RoundRecord) -> None:
        now = time.time()
        if record.accepted >= record.target:
            await self._close(record, note="target reached")
        elif now < record.deadline:
            return
        elif record.accepted >= record.quorum:
            await self._close(
                record, note=f"deadline passed with quorum ({record.accepted} updates)"
            )
        elif record.extensions < self._settings.max_extensions:
            deadline = now + self._settings.round_timeout_s
            await self._store.update_round(
                record.round, deadline=deadline, extensions=record.extensions + 1
            )
            log.warning(
                "round %d deadline extended: %d of %d quorum updates",
                record.round,
                record.accepted,
                record.quorum,
            )
        else:
            await self._abandon(record)

    async def _close(self, record: RoundRecord, *, note: str) -> None:
        await self._store.update_round(
            record.round, status=CLOSING, closed_at=time.time(), note=note
        )
        log.info("round %d closed: %s; %d updates accepted", record.round, note, record.accepted)

    async def _abandon(self, record: RoundRecord) -> None:
        # NOTE: updates accepted in an abandoned round are not applied; the round's
        # model carries over unchanged so that too few clients cannot bias it.
        found = await self._store.model(record.round)
        assert found is not None
        velocity = await self._store.velocity(record.round)
        if velocity is not None:
            await self._store.put_velocity(record.round + 1, velocity)
        await self._store.put_model(record.round + 1, found[0])
        await self._store.update_round(
            record.round,
            status=ABANDONED,
            closed_at=time.time(),
            next_digest=found[1],
            note=f"abandoned: {record.accepted} of {record.quorum} quorum updates at the deadline",
        )
        log.warning(
            "round %d abandoned: %d of %d quorum updates",
            record.round,
            record.accepted,
            record.quorum,
        )

    # -- finalizing -------------------------------------------------------------------------

    async def _maybe_finalize(self, record: RoundRecord, federation: FederationRecord) -> None:
        accepted = await self._store.accepted_ids(record.round)
        missing = accepted - await self._partials.applied_ids(record.round)
        if missing:
            self._log_waiting(
                "round %d waits for workers to count %d acknowledged updates",
                record.round,
                len(missing),
            )
            return

        await self._store.update_round(record.round, status=AGGREGATING)
        spec = federation.spec
        round_sum = await self._partials.round_sum(record.round, size=spec.update_size)
        blob, _digest = await self._store.model(record.round) or (b"", "")
        optimizer = ServerOptimizer(federation.server_learning_rate, federation.server_momentum)
        velocity = await self._store.velocity(record.round) if optimizer.keeps_velocity else None
        new_blob, new_velocity = await asyncio.get_running_loop().run_in_executor(
            None, next_model, blob, spec, round_sum, optimizer, velocity
        )
        # Velocity first: a leader that dies between the two writes leaves the round
        # aggregating, and the next leader recomputes both from unchanged inputs.
        if new_velocity is not None:
            await self._store.put_velocity(record.round + 1, new_velocity)
        digest = await self._store.put_model(record.round + 1, new_blob)
        await self._store.update_round(
            record.round, status=FINALIZED, next_digest=digest, examples=round_sum.examples
        )

        metrics.ROUND_SECONDS.observe(time.time() - record.opened_at)
        log.info(
            "round %d finalized: %d updates, %d examples, model %s",
            record.round,
            round_sum.count,
            round_sum.examples,
            digest[:12],
        )
        if self._evaluator is not None:
            self._evaluations[record.round] = asyncio.create_task(
                self._evaluate(record.round, new_blob, spec)
            )

    async def _evaluate(self, round_id: int, blob: bytes, spec: ModelSpec) -> None:
        assert self._evaluator is not None
        loop = asyncio.get_running_loop()
        try:
            arrays = decode_tensors(blob, max_bytes=sum(t.nbytes for t in spec.tensors))
            accuracy, loss = await loop.run_in_executor(None, self._evaluator, arrays)
        except Exception:
            log.exception("round %d: evaluation failed", round_id)
            return
        try:
            await self._store.update_round(round_id, accuracy=accuracy, loss=loss)
        except FencedError:
            log.warning("round %d: evaluation not recorded, another coordinator leads", round_id)
            return
        metrics.TEST_ACCURACY.set(accuracy)
        metrics.TEST_LOSS.set(loss)
        log.info("round %d: test accuracy %.4f, loss %.4f", round_id, accuracy, loss)

    def _log_waiting(self, message: str, *args: object) -> None:
        if time.monotonic() - self._last_wait_log >= _DRAIN_LOG_EVERY_S:
            self._last_wait_log = time.monotonic()
            log.info(message, *args)


def next_model(
    blob: bytes,
    spec: ModelSpec,
    round_sum: Any,
    optimizer: ServerOptimizer,
    velocity_blob: bytes | None,
) -> tuple[bytes, bytes | None]:
    """The encoded next model and server velocity from a round's exact sum."""
    arrays = decode_tensors(blob, max_bytes=sum(t.nbytes for t in spec.tensors))
    velocity = decode_velocity(velocity_blob, size=spec.update_size)
    step = optimizer.step(arrays, spec, round_sum.mean_update(), velocity)
    kept = encode_velocity(step.velocity) if step.velocity is not None else None
    return encode_tensors(step.model), kept
