"""Shared federation state in Redis (or an embedded stand-in with the same protocol)."""

from fedq.state.connection import StoreUnavailableError, connect_redis
from fedq.state.partials import CommitOutcome, PartialSumStore
from fedq.state.rounds import RoundRecord, RoundStore

__all__ = [
    "CommitOutcome",
    "PartialSumStore",
    "RoundRecord",
    "RoundStore",
    "StoreUnavailableError",
    "connect_redis",
]
