"""The message a gateway queues for each accepted update (msgpack, no pickle)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

__all__ = ["MessageError", "QueuedUpdate"]

_VERSION = 1


class MessageError(ValueError):
    """A queued message is not a valid update message."""


@dataclass(frozen=True)
class QueuedUpdate:
    """An accepted update on its way to the workers."""

    update_id: str
    round: int
    client_id: str
    num_examples: int
    codec: str
    payload: bytes
    accepted_at: float

    def encode(self) -> bytes:
        """Serialize for the broker."""
        return msgpack.packb(
            {
                "v": _VERSION,
                "update_id": self.update_id,
                "round": self.round,
                "client_id": self.client_id,
                "num_examples": self.num_examples,
                "codec": self.codec,
                "payload": self.payload,
                "accepted_at": self.accepted_at,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> QueuedUpdate:
        """Parse a broker message, refusing anything malformed."""
        try:
            raw = msgpack.unpackb(body, raw=False, max_map_len=32, strict_map_key=True)
        except Exception as exc:
            raise MessageError(f"message is not msgpack: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("v") != _VERSION:
            raise MessageError("message is not a version 1 update message")

        try:
            update = cls(
                update_id=str(raw["update_id"]),
                round=int(raw["round"]),
                client_id=str(raw["client_id"]),
                num_examples=int(raw["num_examples"]),
                codec=str(raw["codec"]),
                payload=bytes(raw["payload"]),
                accepted_at=float(raw["accepted_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"message field missing or mistyped: {exc}") from exc
        if update.num_examples < 1 or update.round < 1 or not update.update_id:
            raise MessageError("message has no update id, round or examples")
        return update
