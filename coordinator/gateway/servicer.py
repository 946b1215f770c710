"""The Federation service: Join, FetchModel, SubmitUpdate and WatchRounds."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from coordinator.errors import (
    AuthError,
    BudgetExhaustedError,
    ConflictError,
    CoordinatorError,
    InvalidUpdateError,
    NotParticipantError,
    RoundStateError,
    UnavailableError,
    grpc_status_of,
)
from coordinator.gateway.uploads import read_header, read_payload
from coordinator.gateway.watcher import RoundWatcher
from coordinator.privacy.ledger import LedgerUnavailableError
from coordinator.settings import GatewaySettings
from fedq import metrics
from fedq.plan import TrainingPlan
from fedq.queue import QueueUnavailableError, UpdateQueue
from fedq.queue.message import QueuedUpdate
from fedq.state import RoundStore, StoreUnavailableError
from fedq.state.rounds import SubmissionView
from fedq.state.versions import AsyncVersions
from fedq.tensors import ModelSpec
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from proto.codec import SMALL_PAYLOAD_BYTES, CodecError, check_update

__all__ = ["FederationServicer", "plan_to_proto"]

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_WATCH_HEARTBEAT_S = 15.0
_MESSAGE_SLACK_BYTES = 4096  # ids, headers and msgpack framing around a payload slice


class FederationServicer(pb_grpc.FederationServicer):
    """Implements the wire contract over the shared store and the update queue."""

    def __init__(
        self,
        *,
        store: RoundStore,
        queue: UpdateQueue,
        settings: GatewaySettings,
        watcher: RoundWatcher,
        ledger: Any | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._settings = settings
        self._watcher = watcher
        self._ledger = ledger
        self._spec: ModelSpec | None = None
        self._models: dict[int, tuple[bytes, str]] = {}
        self._mode: tuple[str, int] | None = None  # (mode, max staleness); fixed per federation
        self._federation_read = asyncio.Lock()
        self._versions = AsyncVersions(store.redis)

    # -- Join -------------------------------------------------------------------------------

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        async with _as_grpc_status(context, "Join"):
            if not _CLIENT_ID.match(request.client_id):
                raise InvalidUpdateError(
                    f"client_id {request.client_id[:64]!r}: expected 1-128 letters, digits, "
                    "'.', '_', ':', '-'"
                )
            if request.protocol and request.protocol != "fedq.v1":
                raise InvalidUpdateError(
                    f"protocol {request.protocol!r} is not served; use fedq.v1"
                )
            limit = self._settings.max_examples
            if not 0 < request.num_examples <= limit:
                raise InvalidUpdateError(
                    f"num_examples {request.num_examples}: expected 1..{limit}"
                )

            federation = await self._store.federation()
            capabilities = {
                "samples_per_second": request.capabilities.samples_per_second,
                "memory_bytes": request.capabilities.memory_bytes,
                "upload_bytes_per_second": request.capabilities.upload_bytes_per_second,
                "codecs": list(request.capabilities.codecs),
            }
            token = await self._store.register_client(
                request.client_id, num_examples=request.num_examples, capabilities=capabilities
            )

            current = federation.current_round if federation else 0
            plan = await self._store.plan_for(current, request.client_id) if current else None
            log.info("client %s joined with %d examples", request.client_id, request.num_examples)
            return pb.JoinReply(
                token=token,
                current_round=current,
                plan=plan_to_proto(plan) if plan else None,
                model_name=federation.model_name if federation else "",
            )

    # -- FetchModel -------------------------------------------------------------------------

    async def FetchModel(
        self, request: pb.FetchModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelChunk]:
        async with _as_grpc_status(context, "FetchModel"):
            await self._authenticate(request.client_id, request.token)
            round_id = request.round or self._watcher.state.round
            if round_id < 1:
                raise RoundStateError("no round has opened yet")
            blob, digest = await self._model(round_id)
            if request.offset > len(blob):
                raise InvalidUpdateError(
                    f"offset {request.offset} is past the model's {len(blob)} bytes"
                )

        step = self._settings.chunk_bytes
        for start in range(request.offset, len(blob), step):
            yield pb.ModelChunk(
                round=round_id,
                offset=start,
                total_size=len(blob),
                digest=digest,
                data=blob[start : start + step],
            )

    # -- SubmitUpdate -----------------------------------------------------------------------

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        async with _as_grpc_status(context, "SubmitUpdate"):
            header = await read_header(request_iterator)
            metrics.UPDATES_RECEIVED.inc()
            asynchronous = await self._asynchronous()
            into = await self._admit(header, asynchronous=asynchronous)
            if into is None:
                log.info(
                    "round %d: update %s from %s is a duplicate",
                    header.round,
                    header.update_id,
                    header.client_id,
                )
                return pb.SubmitReply(
                    outcome=pb.SubmitReply.DUPLICATE,
                    update_id=header.update_id,
                    message="already accepted",
                )

            spec = await self._model_spec()
            payload = await read_payload(
                request_iterator, header, max_bytes=self._max_update_bytes(spec)
            )
            if len(payload) <= SMALL_PAYLOAD_BYTES:  # a thread hop would cost more
                self._check_tensors(payload, spec)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._check_tensors, payload, spec
                )

            await self._enqueue(header, payload, into=into, asynchronous=asynchronous)
            metrics.UPDATES_ACCEPTED.inc()
            log.info(
                "round %d: accepted update %s from %s (%d examples, %d bytes)",
                header.round,
                header.update_id,
                header.client_id,
                header.num_examples,
                len(payload),
            )
            return pb.SubmitReply(
                outcome=pb.SubmitReply.ACCEPTED, update_id=header.update_id, message="accepted"
            )

    # -- WatchRounds ------------------------------------------------------------------------

    async def WatchRounds(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundEvent]:
        async with _as_grpc_status(context, "WatchRounds"):
            await self._authenticate(request.client_id, request.token)

        self._watcher.add_watcher(request.client_id)
        try:
            async for event in self._round_events(request.client_id, request.after_round):
                yield event
        finally:
            self._watcher.remove_watcher(request.client_id)

    async def _round_events(self, client_id: str, after_round: int) -> AsyncIterator[pb.RoundEvent]:
        opened_sent = closed_sent = after_round
        version = -1
        while True:
            state = self._watcher.state
            if state.round > opened_sent and state.round_status == "open":
                opened_sent = state.round
                yield await self._opened_event(client_id, state.round, state)
            if state.round > closed_sent and state.round_status not in ("open", ""):
                closed_sent = opened_sent = max(opened_sent, state.round)
                yield pb.RoundEvent(kind=pb.RoundEvent.CLOSED, round=state.round)
            if state.federation_status == "finished":
                yield pb.RoundEvent(kind=pb.RoundEvent.FINISHED, round=state.round)
                return
            version = await self._watcher.wait_change(version, timeout_s=_WATCH_HEARTBEAT_S)

    async def _opened_event(self, client_id: str, round_id: int, state: Any) -> pb.RoundEvent:
        plan = await self._store.plan_for(round_id, client_id)
        reason = "" if plan else await self._store.exclusion_of(round_id, client_id)
        return pb.RoundEvent(
            kind=pb.RoundEvent.OPENED,
            round=round_id,
            selected=plan is not None,
            plan=plan_to_proto(plan) if plan else None,
            model_digest=state.model_digest,
            deadline_unix=state.deadline,
            reason="" if plan else reason or "not selected for this round",
        )

    # -- helpers ----------------------------------------------------------------------------

    async def _authenticate(self, client_id: str, token: str) -> None:
        if not await self._store.check_token(client_id, token):
            raise AuthError("unknown client or invalid token; call Join again")

    async def _asynchronous(self) -> bool:
        await self._read_federation()
        return self._mode is not None and self._mode[0] == "async"

    async def _read_federation(self) -> None:
        """Read the federation's fixed facts (mode, model spec) once per gateway."""
        if self._spec is not None:
            return
        # A burst of first uploads waits for one read instead of each parsing the spec.
        async with self._federation_read:
            if self._spec is None:
                federation = await self._store.federation()
                if federation is not None:
                    self._mode = (federation.mode, federation.max_staleness)
                    self._spec = federation.spec

    async def _admit(self, header: pb.UpdateHeader, *, asynchronous: bool) -> int | None:
        """Authenticate and check an update: the round it goes into, None if a duplicate."""
        if asynchronous:
            await self._authenticate(header.client_id, header.token)
            if await self._versions.version_of(header.update_id) is not None:
                return None
            return await self._check_admissible_async(header)

        # One round trip reads all that the checks of a synchronous round need.
        view = await self._store.submission_view(
            header.round, client_id=header.client_id, token=header.token, update_id=header.update_id
        )
        if not view.token_valid:
            raise AuthError("unknown client or invalid token; call Join again")
        if view.accepted:
            return None
        await self._check_admissible(header, view)
        return header.round

    async def _check_admissible_async(self, header: pb.UpdateHeader) -> int:
        """Check an update of asynchronous mode; returns the open version it goes into.

        ``header.round`` is the version the update was trained on. It must have been
        handed to this client, and lag the open version by at most the federation's
        maximum staleness.
        """
        assert self._mode is not None
        max_staleness = self._mode[1]
        federation = await self._store.federation()
        version = federation.current_round if federation else 0
        status = await self._store.round_status(version) if version else None
        if status != "open":
            # Between two versions (the last one is being aggregated): a moment's wait.
            raise UnavailableError(f"no model version is open right now ({status}); retry")
        if not 1 <= header.round <= version:
            raise RoundStateError(f"version {header.round} does not exist")
        if version - header.round > max_staleness:
            raise RoundStateError(
                f"update trained on version {header.round} is too stale: version {version} "
                f"is open and updates at most {max_staleness} versions behind are taken"
            )

        if await self._store.plan_for(header.round, header.client_id) is None:
            raise NotParticipantError(
                f"client {header.client_id} was not handed version {header.round}"
            )
        await self._check_budget(header.client_id)
        if header.num_examples > self._settings.max_examples:
            raise InvalidUpdateError(
                f"num_examples {header.num_examples} exceeds {self._settings.max_examples}"
            )
        return version

    async def _check_budget(self, client_id: str) -> None:
        if self._ledger is None:
            return
        spent, budget = await self._ledger.standing(client_id)
        if spent > budget + 1e-9:
            raise BudgetExhaustedError(
                f"privacy budget exhausted: ε spent {spent:.3f} of {budget:.3f} allowed"
            )

    async def _check_admissible(self, header: pb.UpdateHeader, view: SubmissionView) -> None:
        """Check an update of synchronous mode against the state read with it."""
        if view.status is None:
            raise RoundStateError(f"round {header.round} does not exist")
        if view.status != "open":
            raise RoundStateError(
                f"round {header.round} is {view.status}; it no longer takes updates"
            )

        if view.plan is None:
            reason = view.exclusion
            if reason is not None and reason.startswith("privacy budget"):
                raise BudgetExhaustedError(reason)
            raise NotParticipantError(
                f"client {header.client_id} is not a participant of round {header.round}"
            )
        await self._check_budget(header.client_id)

        earlier = view.earlier
        if earlier is not None and earlier != header.update_id:
            raise ConflictError(
                f"client {header.client_id} already submitted update {earlier} "
                f"for round {header.round}"
            )
        if header.num_examples > self._settings.max_examples:
            raise InvalidUpdateError(
                f"num_examples {header.num_examples} exceeds {self._settings.max_examples}"
            )

    def _check_tensors(self, payload: bytes | bytearray, spec: ModelSpec) -> None:
        """Decode and check a slice at a time: no tensor is ever decoded whole."""
        try:
            check_update(payload, spec, max_abs_value=self._settings.max_abs_value)
        except CodecError as exc:
            raise InvalidUpdateError(str(exc)) from exc

    async def _enqueue(
        self, header: pb.UpdateHeader, payload: bytes, *, into: int, asynchronous: bool
    ) -> None:
        """Publish the update into round ``into``: one message, or parts when it is larger."""
        step = self._settings.max_message_bytes - _MESSAGE_SLACK_BYTES
        parts = max(1, -(-len(payload) // step))
        digest = hashlib.sha256(payload).hexdigest() if parts > 1 else ""
        view = memoryview(payload)
        accepted_at = time.time()
        try:
            # In order and one at a time: each part waits for its confirm, and the client
            # hears "accepted" only after the last one. A retry after a failure here
            # republishes every part; workers store parts idempotently.
            for part in range(parts):
                message = QueuedUpdate(
                    update_id=header.update_id,
                    round=into,
                    client_id=header.client_id,
                    num_examples=header.num_examples,
                    codec=header.codec,
                    payload=view[part * step : (part + 1) * step],  # type: ignore[arg-type]
                    accepted_at=accepted_at,
                    part=part,
                    parts=parts,
                    digest=digest,
                    steps=_steps_done(header),
                    base_version=header.round if asynchronous else 0,
                )
                headers = {"round": into, "update_id": header.update_id}
                if parts > 1:
                    headers.update(part=part, parts=parts)
                await self._queue.publish(
                    message.encode(), message_id=header.update_id, headers=headers
                )
        except QueueUnavailableError as exc:
            raise UnavailableError(f"update not queued, please retry: {exc}") from exc
        await self._store.record_accepted(
            into, client_id=header.client_id, update_id=header.update_id
        )
        if asynchronous:
            await self._versions.mark(header.update_id, into)

    async def _model_spec(self) -> ModelSpec:
        await self._read_federation()
        if self._spec is None:
            raise RoundStateError("the federation has not started")
        return self._spec

    def _max_update_bytes(self, spec: ModelSpec) -> int:
        if self._settings.max_update_bytes:
            return self._settings.max_update_bytes
        # Lossless compression can grow incompressible data slightly; the envelope adds
        # names and shapes.
        return int(spec.update_nbytes * 1.05) + 64 * 1024

    async def _model(self, round_id: int) -> tuple[bytes, str]:
        cached = self._models.get(round_id)
        if cached is not None:
            return cached
        found = await self._store.model(round_id)
        if found is None:
            raise RoundStateError(f"round {round_id} has no model")
        self._models = {r: m for r, m in self._models.items() if r > round_id - 2}
        self._models[round_id] = found
        return found


def _steps_done(header: pb.UpdateHeader) -> int:
    """Local steps the client reports in ``metrics["steps"]``; 0 when absent or invalid."""
    steps = header.metrics.get("steps", 0.0)
    if not math.isfinite(steps) or steps < 1:
        return 0
    return int(min(steps, 1e9))


def plan_to_proto(plan: TrainingPlan) -> pb.TrainingPlan:
    """Protobuf form of a training plan."""
    return pb.TrainingPlan(**plan.to_dict())


@asynccontextmanager
async def _as_grpc_status(context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Turn our errors into a status with a clear message; anything else into INTERNAL."""
    try:
        yield
    except CoordinatorError as exc:
        code, message, reason = grpc_status_of(exc)
        if rpc == "SubmitUpdate":
            metrics.UPDATES_REJECTED.labels(reason=reason).inc()
        log.warning("%s refused (%s): %s", rpc, code.name, message)
        await context.abort(code, message)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except DecodeError as exc:
        # A client stream's messages are parsed only as the handler reads them.
        log.warning("%s refused (INVALID_ARGUMENT): %s", rpc, exc)
        if rpc == "SubmitUpdate":
            metrics.UPDATES_REJECTED.labels(reason="invalid").inc()
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed {rpc} message: it does not parse"
        )
    except (RedisError, StoreUnavailableError, LedgerUnavailableError, OSError) as exc:
        log.warning("%s: store unavailable: %s", rpc, exc)
        if rpc == "SubmitUpdate":
            metrics.UPDATES_REJECTED.labels(reason="unavailable").inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "state store unavailable; retry")
    except Exception:
        log.exception("%s failed unexpectedly", rpc)
        if rpc == "SubmitUpdate":
            metrics.UPDATES_REJECTED.labels(reason="internal").inc()
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
