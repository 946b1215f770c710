"""Receiving one chunked upload: header first, bounded payload, checksum trailer."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coordinator.errors import IntegrityError, InvalidUpdateError, UpdateTooLargeError
from proto import fedq_v1_pb2 as pb
from proto.codec import CODECS

__all__ = ["Upload", "read_header", "read_payload"]

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Upload:
    """A fully received upload whose checksum matched."""

    header: pb.UpdateHeader
    payload: bytes


async def read_header(stream: AsyncIterator[pb.UpdateChunk]) -> pb.UpdateHeader:
    """The first message of an upload, checked for well-formedness."""
    first = await anext(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidUpdateError("upload must start with a header")
    header = first.header

    if not _ID.match(header.client_id):
        raise InvalidUpdateError(f"client_id {header.client_id[:64]!r} is not a valid id")
    if not _ID.match(header.update_id):
        raise InvalidUpdateError(
            f"update_id {header.update_id[:64]!r}: expected 1-128 letters, digits, "
            "'.', '_', ':', '-'"
        )
    if header.round < 1:
        raise InvalidUpdateError("header.round must be >= 1")
    if header.num_examples < 1:
        raise InvalidUpdateError("header.num_examples must be >= 1")
    if header.codec not in CODECS:
        raise InvalidUpdateError(f"codec {header.codec!r}: expected one of {', '.join(CODECS)}")
    return header


async def read_payload(
    stream: AsyncIterator[pb.UpdateChunk], header: pb.UpdateHeader, *, max_bytes: int
) -> bytearray:
    """Receive the declared payload and check it against the trailer's checksum.

    The receive buffer itself is returned (no copy): for a large model it is the
    biggest object the gateway holds.
    """
    if header.total_size == 0:
        raise InvalidUpdateError("header.total_size must be > 0")
    if header.total_size > max_bytes:
        raise UpdateTooLargeError(
            f"update declares {header.total_size} bytes; this model allows at most {max_bytes}"
        )

    buffer = bytearray(header.total_size)  # filled in place: no regrowth, no copies
    filled = 0
    trailer = None
    async for chunk in stream:
        part = chunk.WhichOneof("part")
        if part == "data":
            data = chunk.data  # each read of a bytes field makes a new copy
            end = filled + len(data)
            if end > header.total_size:
                raise UpdateTooLargeError(
                    f"update sent more than the {header.total_size} bytes its header declared"
                )
            buffer[filled:end] = data
            filled = end
        elif part == "trailer":
            trailer = chunk.trailer
            break
        else:
            raise InvalidUpdateError(f"unexpected {part or 'empty'} message inside an upload")

    if trailer is None or filled != header.total_size:
        raise IntegrityError(
            f"upload truncated: received {filled} of {header.total_size} bytes"
            + ("" if trailer is None else " before the trailer")
        )
    # The trailer ends an upload: a client that sends more is out of step with the protocol.
    extra = await anext(aiter(stream), None)
    if extra is not None:
        raise InvalidUpdateError(
            f"unexpected {extra.WhichOneof('part') or 'empty'} message after the trailer"
        )
    digest = hashlib.sha256(buffer).hexdigest()
    if digest != trailer.sha256.lower():
        raise IntegrityError(f"checksum mismatch: payload sha256 is {digest[:16]}…")
    return buffer
