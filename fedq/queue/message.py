"""The message a gateway queues for each accepted update (msgpack, no pickle)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

__all__ = ["MessageError", "QueuedUpdate"]

_VERSION = 1
_MAX_PARTS = 1 << 16


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
    part: int = 0
    parts: int = 1  # more than one: ``payload`` is one slice of an update split in order
    digest: str = ""  # sha256 hex of the whole payload, set on every part of a split one
    steps: int = 0  # local steps the client reports it took; 0: not reported
    base_version: int = 0  # asynchronous mode: the model version it trained on; 0: ``round``

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
                "part": self.part,
                "parts": self.parts,
                "digest": self.digest,
                "steps": self.steps,
                "base_version": self.base_version,
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
                part=int(raw.get("part", 0)),
                parts=int(raw.get("parts", 1)),
                digest=str(raw.get("digest", "")),
                steps=int(raw.get("steps", 0)),
                base_version=int(raw.get("base_version", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"message field missing or mistyped: {exc}") from exc
        if update.num_examples < 1 or update.round < 1 or not update.update_id:
            raise MessageError("message has no update id, round or examples")
        if not 0 <= update.part < update.parts <= _MAX_PARTS:
            raise MessageError(f"part {update.part} of {update.parts} is out of range")
        if update.steps < 0 or not 0 <= update.base_version <= update.round:
            raise MessageError(
                f"steps {update.steps} or base version {update.base_version} is out of range"
            )
        if update.parts > 1 and len(update.digest) != 64:
            raise MessageError("a part of a split update carries no payload digest")
        return update
