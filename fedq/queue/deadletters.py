"""Describing dead letters the same way for every queue: id, reason, round, client, time."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Collection, Mapping
from typing import Any

from fedq.queue.base import (
    ALL_DEAD_LETTERS,
    DEAD_AT_HEADER,
    REASON_HEADER,
    REQUEUED_HEADER,
    DeadLetter,
    DeadLetterSelection,
)
from fedq.queue.message import MessageError, QueuedUpdate

__all__ = [
    "dead_letter_id",
    "dead_letter_to_public",
    "describe_dead_letter",
    "missing_ids",
    "requeue_headers",
    "selects",
]

# Headers the broker or a worker adds when a message dies; a requeued copy drops them.
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
    REASON_HEADER,
    DEAD_AT_HEADER,
)


def dead_letter_id(message_id: str | None, body: bytes) -> str:
    """The name of a dead letter: its message id, else a digest of its body."""
    if message_id:
        return message_id
    return "sha256:" + hashlib.sha256(body).hexdigest()[:16]


def selects(selection: DeadLetterSelection, letter_id: str) -> bool:
    """Whether ``letter_id`` is among the chosen dead letters."""
    return selection is ALL_DEAD_LETTERS or letter_id in selection


def missing_ids(selection: DeadLetterSelection, found: Collection[str]) -> list[str]:
    """Requested ids that matched no dead letter (none when everything was asked for)."""
    if selection is ALL_DEAD_LETTERS:
        return []
    return sorted(set(selection) - set(found))


def describe_dead_letter(
    body: bytes,
    headers: Mapping[str, Any],
    *,
    message_id: str | None,
    reason: str | None = None,
    dead_at: float | None = None,
    detail: bool = False,
) -> DeadLetter:
    """A ``DeadLetter`` for a message body and its headers.

    The reason is the worker's (``x-fedq-reason``), else the broker's first ``x-death``
    reason (``delivery_limit``, ``rejected``, ``expired``), else ``reason``.
    """
    update, problem = _decode(body)
    letter = DeadLetter(
        message_id=dead_letter_id(message_id, body),
        reason=_reason(headers) or reason or "dead-lettered",
        headers=dict(headers),
        size=len(body),
        round=update.round if update else _int_or_none(headers.get("round")),
        client_id=update.client_id if update else None,
        dead_at=_dead_at(headers) or dead_at,
    )
    if detail:
        letter.update = _summary(update) if update else {"decodable": False, "error": problem}
    return letter


def dead_letter_to_public(letter: DeadLetter) -> dict[str, Any]:
    """JSON-friendly view of a dead letter (headers made JSON-safe)."""
    out: dict[str, Any] = {
        "id": letter.message_id,
        "reason": letter.reason,
        "round": letter.round,
        "client": letter.client_id,
        "size": letter.size,
        "when": letter.dead_at,
    }
    if letter.update is not None:
        out["headers"] = _jsonable(letter.headers)
        out["update"] = letter.update
    return out


def requeue_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers for a requeued copy: no death records, one more requeue counted."""
    kept = {k: v for k, v in headers.items() if k not in _DEATH_HEADERS}
    kept[REQUEUED_HEADER] = (_int_or_none(headers.get(REQUEUED_HEADER)) or 0) + 1
    return kept


def _decode(body: bytes) -> tuple[QueuedUpdate | None, str]:
    try:
        return QueuedUpdate.decode(body), ""
    except MessageError as exc:
        return None, str(exc)


def _summary(update: QueuedUpdate) -> dict[str, Any]:
    return {
        "decodable": True,
        "update_id": update.update_id,
        "round": update.round,
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "codec": update.codec,
        "payload_bytes": len(update.payload),
        "part": update.part,
        "parts": update.parts,
        "accepted_at": update.accepted_at,
    }


def _reason(headers: Mapping[str, Any]) -> str:
    mine = headers.get(REASON_HEADER)
    if mine:
        return _text(mine)
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], Mapping) and deaths[0].get("reason"):
        return _text(deaths[0]["reason"])
    return ""


def _dead_at(headers: Mapping[str, Any]) -> float | None:
    mine = headers.get(DEAD_AT_HEADER)
    if isinstance(mine, int) and not isinstance(mine, bool):
        return mine / 1000.0
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], Mapping):
        when = deaths[0].get("time")
        if isinstance(when, datetime.datetime):
            return when.timestamp()
    return None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
