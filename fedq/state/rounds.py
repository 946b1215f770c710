"""Rounds, models and client registrations in Redis.

Everything a coordinator needs to continue after a restart lives here, so any
coordinator, gateway or worker process can read the federation's state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis.asyncio as aioredis

from fedq.plan import TrainingPlan
from fedq.state import keys
from fedq.tensors import ModelSpec

__all__ = [
    "ClientRecord",
    "FederationRecord",
    "FencedError",
    "RoundRecord",
    "RoundStore",
    "SubmissionView",
]

# Round statuses. ``open`` takes uploads; ``closing`` takes no new uploads but still
# aggregates what the gateways acknowledged; ``finalized`` has its model computed.
OPEN, CLOSING, FINALIZED, ABANDONED = "open", "closing", "finalized", "abandoned"


@dataclass
class FederationRecord:
    """The federation's fixed facts and progress."""

    model_name: str
    dataset: str
    spec: ModelSpec
    total_rounds: int
    current_round: int = 0
    status: str = "waiting"  # waiting -> running -> finished
    mode: str = "sync"  # "async": rounds are model versions of buffered updates
    max_staleness: int = 0  # async: versions an update's base may lag the open one
    server_learning_rate: float = 1.0  # the server's step (see coordinator.rounds.server_optimizer)
    server_momentum: float = 0.0

    def to_public(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "model": self.model_name,
            "dataset": self.dataset,
            "total_rounds": self.total_rounds,
            "current_round": self.current_round,
            "status": self.status,
            "parameters": self.spec.update_size,
        }


@dataclass
class RoundRecord:
    """One round as stored in its hash."""

    round: int
    status: str
    opened_at: float
    deadline: float
    target: int
    quorum: int
    participants: list[str] = field(default_factory=list)
    model_digest: str = ""
    aggregated: int = 0
    accepted: int = 0
    closed_at: float = 0.0
    examples: int = 0
    accuracy: float | None = None
    loss: float | None = None
    next_digest: str = ""
    extensions: int = 0
    note: str = ""

    def to_public(self) -> dict[str, Any]:
        """JSON-friendly view for the REST API."""
        return {
            "round": self.round,
            "status": self.status,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
            "closed_at": self.closed_at or None,
            "target": self.target,
            "quorum": self.quorum,
            "participants": self.participants,
            "updates_received": self.accepted,
            "updates_aggregated": self.aggregated,
            "examples": self.examples,
            "test_accuracy": self.accuracy,
            "test_loss": self.loss,
            "model_digest": self.model_digest,
            "result_digest": self.next_digest or None,
            "deadline_extensions": self.extensions,
            "note": self.note or None,
        }


@dataclass
class ClientRecord:
    """A registered client."""

    client_id: str
    num_examples: int
    joined_at: float
    last_seen: float
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmissionView:
    """What a gateway checks before it takes an update for a round."""

    token_valid: bool
    accepted: bool  # this update id was already acknowledged in the round
    status: str | None  # None: the round never opened
    plan: TrainingPlan | None  # None: the client is not a participant
    exclusion: str | None  # why the client was left out, if for a stated reason
    earlier: str | None  # the update id the client already submitted in the round


class FencedError(RuntimeError):
    """A write was refused because another coordinator has taken the lead."""


# KEYS: fence counter, hash. ARGV: fencing token, then field/value pairs.
_FENCED_HSET = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""


class RoundStore:
    """Typed access to the federation, rounds, models and client registry.

    With ``fence`` set (a leading coordinator's fencing token), writes of round
    records and federation progress succeed only while that token is current.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.fence: int | None = None
        self._fenced_hset = redis.register_script(_FENCED_HSET)

    async def _hset(self, key: str, mapping: dict[str, Any]) -> None:
        if self.fence is None:
            await self.redis.hset(key, mapping=mapping)
            return
        flat: list[Any] = []
        for field_name, value in mapping.items():
            flat += [field_name, value]
        if not await self._fenced_hset(
            keys=[keys.LEADER + ":fence", key], args=[self.fence, *flat]
        ):
            raise FencedError(f"fencing token {self.fence} is stale; another coordinator leads")

    # -- federation -------------------------------------------------------------------------

    async def init_federation(self, record: FederationRecord, *, initial_model: bytes) -> bool:
        """Create the federation and round 1's model unless one exists; True if created."""
        created = await self.redis.hsetnx(keys.FEDERATION, "model", record.model_name)
        if not created:
            return False
        await self.put_model(1, initial_model)
        await self.redis.hset(
            keys.FEDERATION,
            mapping={
                "dataset": record.dataset,
                "spec": json.dumps(record.spec.to_records()),
                "total_rounds": record.total_rounds,
                "current_round": 0,
                "status": "waiting",
                "mode": record.mode,
                "max_staleness": record.max_staleness,
                "server_learning_rate": record.server_learning_rate,
                "server_momentum": record.server_momentum,
            },
        )
        return True

    async def federation(self) -> FederationRecord | None:
        """The federation record, or None before one was created."""
        raw = _decode(await self.redis.hgetall(keys.FEDERATION))
        if "spec" not in raw:
            return None
        return FederationRecord(
            model_name=raw["model"],
            dataset=raw.get("dataset", ""),
            spec=ModelSpec.from_records(json.loads(raw["spec"])),
            total_rounds=int(raw["total_rounds"]),
            current_round=int(raw.get("current_round", 0)),
            status=raw.get("status", "waiting"),
            mode=raw.get("mode", "sync"),
            max_staleness=int(raw.get("max_staleness") or 0),
            server_learning_rate=float(raw.get("server_learning_rate") or 1.0),
            server_momentum=float(raw.get("server_momentum") or 0.0),
        )

    async def set_progress(self, *, current_round: int, status: str) -> None:
        """Record the current round and federation status."""
        await self._hset(keys.FEDERATION, {"current_round": current_round, "status": status})

    # -- rounds -----------------------------------------------------------------------------

    async def put_round(self, record: RoundRecord) -> None:
        """Write a whole round record."""
        mapping = {
            "status": record.status,
            "opened_at": record.opened_at,
            "deadline": record.deadline,
            "target": record.target,
            "quorum": record.quorum,
            "participants": json.dumps(record.participants),
            "model_digest": record.model_digest,
            "closed_at": record.closed_at,
            "examples": record.examples,
            "next_digest": record.next_digest,
            "extensions": record.extensions,
            "note": record.note,
            "accuracy": "" if record.accuracy is None else record.accuracy,
            "loss": "" if record.loss is None else record.loss,
        }
        await self._hset(keys.round_hash(record.round), mapping)

    async def update_round(self, round_id: int, **fields: Any) -> None:
        """Change some fields of a round record."""
        mapping = {k: ("" if v is None else v) for k, v in fields.items()}
        await self._hset(keys.round_hash(round_id), mapping)

    async def round(self, round_id: int) -> RoundRecord | None:
        """A round record with live counts, or None if the round never opened."""
        raw = _decode(await self.redis.hgetall(keys.round_hash(round_id)))
        if "status" not in raw:
            return None
        accepted = await self.redis.scard(keys.accepted(round_id))
        return RoundRecord(
            round=round_id,
            status=raw["status"],
            opened_at=float(raw["opened_at"]),
            deadline=float(raw["deadline"]),
            target=int(raw["target"]),
            quorum=int(raw["quorum"]),
            participants=json.loads(raw.get("participants", "[]")),
            model_digest=raw.get("model_digest", ""),
            aggregated=int(raw.get("aggregated", 0)),
            accepted=int(accepted),
            closed_at=float(raw.get("closed_at") or 0.0),
            examples=int(raw.get("examples") or 0),
            accuracy=float(raw["accuracy"]) if raw.get("accuracy") else None,
            loss=float(raw["loss"]) if raw.get("loss") else None,
            next_digest=raw.get("next_digest", ""),
            extensions=int(raw.get("extensions") or 0),
            note=raw.get("note", ""),
        )

    async def round_status(self, round_id: int) -> str | None:
        """Just the status of a round (cheap, for hot paths)."""
        value = await self.redis.hget(keys.round_hash(round_id), "status")
        return value.decode() if value is not None else None

    async def put_plans(self, round_id: int, plans: dict[str, TrainingPlan]) -> None:
        """Store the plans handed to the round's participants."""
        if plans:
            await self.redis.hset(
                keys.plans(round_id),
                mapping={cid: msgpack.packb(p.to_dict()) for cid, p in plans.items()},
            )

    async def plan_for(self, round_id: int, client_id: str) -> TrainingPlan | None:
        """The plan a participant got, or None if it was not selected."""
        raw = await self.redis.hget(keys.plans(round_id), client_id)
        return TrainingPlan.from_dict(msgpack.unpackb(raw)) if raw is not None else None

    async def put_exclusions(self, round_id: int, reasons: dict[str, str]) -> None:
        """Record why clients were left out of a round."""
        if reasons:
            await self.redis.hset(keys.excluded(round_id), mapping=reasons)

    async def exclusion_of(self, round_id: int, client_id: str) -> str | None:
        """Why a client was left out of a round, if it was for a stated reason."""
        value = await self.redis.hget(keys.excluded(round_id), client_id)
        return value.decode() if value is not None else None

    # -- acceptance (gateway side) ----------------------------------------------------------

    async def submission_view(
        self, round_id: int, *, client_id: str, token: str, update_id: str
    ) -> SubmissionView:
        """Everything a gateway checks before taking an update, in one round trip."""
        # Not a MULTI: the client's hash lies outside the round's hash tag, and these
        # reads were never atomic together; one pipeline just saves the round trips.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.client(client_id), "token_sha256")
        pipe.sismember(keys.accepted(round_id), update_id)
        pipe.hget(keys.round_hash(round_id), "status")
        pipe.hget(keys.plans(round_id), client_id)
        pipe.hget(keys.excluded(round_id), client_id)
        pipe.hget(keys.submitted(round_id), client_id)
        stored, accepted, status, plan, reason, earlier = await pipe.execute()

        return SubmissionView(
            token_valid=_token_matches(stored, token),
            accepted=bool(accepted),
            status=_text(status),
            plan=TrainingPlan.from_dict(msgpack.unpackb(plan)) if plan is not None else None,
            exclusion=_text(reason),
            earlier=_text(earlier),
        )

    async def submission_of(self, round_id: int, client_id: str) -> str | None:
        """The update id a client already submitted in a round, if any."""
        value = await self.redis.hget(keys.submitted(round_id), client_id)
        return value.decode() if value is not None else None

    async def is_accepted(self, round_id: int, update_id: str) -> bool:
        """Whether a gateway already acknowledged this update id."""
        return bool(await self.redis.sismember(keys.accepted(round_id), update_id))

    async def record_accepted(self, round_id: int, *, client_id: str, update_id: str) -> None:
        """Note an update the broker confirmed (idempotent)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(keys.accepted(round_id), update_id)
        pipe.hset(keys.submitted(round_id), client_id, update_id)
        await pipe.execute()

    async def accepted_ids(self, round_id: int) -> set[str]:
        """Every update id acknowledged in the round."""
        return {m.decode() for m in await self.redis.smembers(keys.accepted(round_id))}

    # -- models -----------------------------------------------------------------------------

    async def put_model(self, round_id: int, blob: bytes) -> str:
        """Store the global model clients train in ``round_id``; returns its digest."""
        digest = hashlib.sha256(blob).hexdigest()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.model(round_id), blob)
        pipe.hset(keys.FEDERATION, f"digest:{round_id}", digest)
        await pipe.execute()
        return digest

    async def model(self, round_id: int) -> tuple[bytes, str] | None:
        """The encoded model of a round and its digest."""
        blob = await self.redis.get(keys.model(round_id))
        if blob is None:
            return None
        digest = await self.redis.hget(keys.FEDERATION, f"digest:{round_id}")
        return blob, digest.decode() if digest else hashlib.sha256(blob).hexdigest()

    async def put_velocity(self, round_id: int, blob: bytes) -> None:
        """Store the server momentum that the step into ``round_id`` produced."""
        await self.redis.set(keys.velocity(round_id), blob)

    async def velocity(self, round_id: int) -> bytes | None:
        """The server momentum kept for the step after round ``round_id``, if any."""
        return await self.redis.get(keys.velocity(round_id))

    async def model_digest(self, round_id: int) -> str | None:
        """Digest of a round's model without fetching it."""
        digest = await self.redis.hget(keys.FEDERATION, f"digest:{round_id}")
        return digest.decode() if digest else None

    # -- clients ----------------------------------------------------------------------------

    async def register_client(
        self, client_id: str, *, num_examples: int, capabilities: dict[str, Any]
    ) -> str:
        """Register or re-register a client; returns a fresh bearer token."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(keys.client(client_id), "joined_at", now)
        pipe.hset(
            keys.client(client_id),
            mapping={
                "token_sha256": _token_digest(token),
                "num_examples": num_examples,
                "last_seen": now,
                "capabilities": json.dumps(capabilities),
            },
        )
        pipe.sadd(keys.CLIENTS, client_id)
        await pipe.execute()
        return token

    async def check_token(self, client_id: str, token: str) -> bool:
        """Whether ``token`` is the current token of ``client_id``."""
        return _token_matches(await self.redis.hget(keys.client(client_id), "token_sha256"), token)

    async def touch_client(self, client_id: str) -> None:
        """Note that a client is alive."""
        await self.redis.hset(keys.client(client_id), "last_seen", time.time())

    async def clients(self) -> list[ClientRecord]:
        """Every registered client, by id."""
        ids = sorted(m.decode() for m in await self.redis.smembers(keys.CLIENTS))
        pipe = self.redis.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(keys.client(cid))
        records = []
        for cid, raw in zip(ids, await pipe.execute(), strict=True):
            fields = _decode(raw)
            if not fields:
                continue
            records.append(
                ClientRecord(
                    client_id=cid,
                    num_examples=int(fields.get("num_examples", 0)),
                    joined_at=float(fields.get("joined_at", 0)),
                    last_seen=float(fields.get("last_seen", 0)),
                    capabilities=json.loads(fields.get("capabilities", "{}")),
                )
            )
        return records


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_matches(stored: bytes | None, token: str) -> bool:
    if stored is None or not token:
        return False
    return hmac.compare_digest(stored.decode(), _token_digest(token))


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


async def reset_federation(redis: aioredis.Redis) -> int:
    """Delete every fedq key (a fresh federation); returns how many were removed."""
    removed = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=keys.PREFIX + "*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            removed += await redis.delete(*batch)
            batch.clear()
    if batch:
        removed += await redis.delete(*batch)
    return removed
