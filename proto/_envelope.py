"""Reading the codec's msgpack envelope with its binary fields left in the payload.

msgpack's own unpacker copies every binary field into a new ``bytes``: for an update
of hundreds of MB, a second copy of the payload. ``unpack`` reads the same msgpack
and returns each binary field as a read-only ``memoryview`` of the payload instead.
It takes every msgpack type but extension types, refuses map keys that are not
strings, and bounds what a hostile payload can make it build: lengths (each checked
against the bytes left before anything is read), nesting depth and the number of
values.

``unpack_copying`` reads the same envelope with msgpack's C reader, under the same
length limits, and returns binary fields as ``bytes``. It is an order of magnitude
faster on an envelope of many small records, and costs one copy of the binary
fields; ``proto.codec`` uses it for payloads small enough that the copy does not
matter. It bounds nesting by msgpack's own stack, and the number of values only by
the payload's length (each value takes at least one byte).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

__all__ = ["EnvelopeError", "Limits", "unpack", "unpack_copying"]


class EnvelopeError(ValueError):
    """The payload is not msgpack, or goes beyond the limits."""


@dataclass(frozen=True)
class Limits:
    """What one payload may hold."""

    max_bin_len: int
    max_str_len: int
    max_array_len: int
    max_map_len: int
    max_depth: int = 16
    max_values: int = 1 << 20


# Tags with a fixed-size argument: kind and the argument's big-endian layout.
_TAGS: dict[int, tuple[str, struct.Struct]] = {
    tag: (kind, struct.Struct(form))
    for tag, kind, form in [
        (0xC4, "bin", ">B"),
        (0xC5, "bin", ">H"),
        (0xC6, "bin", ">I"),
        (0xCA, "float", ">f"),
        (0xCB, "float", ">d"),
        (0xCC, "int", ">B"),
        (0xCD, "int", ">H"),
        (0xCE, "int", ">I"),
        (0xCF, "int", ">Q"),
        (0xD0, "int", ">b"),
        (0xD1, "int", ">h"),
        (0xD2, "int", ">i"),
        (0xD3, "int", ">q"),
        (0xD9, "str", ">B"),
        (0xDA, "str", ">H"),
        (0xDB, "str", ">I"),
        (0xDC, "array", ">H"),
        (0xDD, "array", ">I"),
        (0xDE, "map", ">H"),
        (0xDF, "map", ">I"),
    ]
}
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}


def unpack(payload: bytes | bytearray | memoryview, limits: Limits) -> object:
    """The one msgpack value that makes up ``payload``, binary fields as views of it.

    Raises:
        EnvelopeError: saying what is malformed and where.
    """
    view = memoryview(payload).cast("B").toreadonly()
    reader = _Reader(view, limits)
    value = reader.value(depth=0)
    if reader.pos != len(view):
        raise EnvelopeError(f"{len(view) - reader.pos} bytes follow the envelope")
    return value


def unpack_copying(payload: bytes | bytearray | memoryview, limits: Limits) -> object:
    """The one msgpack value that makes up ``payload``, binary fields copied out as ``bytes``.

    Refuses what ``unpack`` refuses, but for the count of values (see the module's text).

    Raises:
        EnvelopeError: saying what is malformed.
    """
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise EnvelopeError(f"{len(exc.extra)} bytes follow the envelope") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        detail = str(exc) or type(exc).__name__
        raise EnvelopeError(f"not msgpack within the limits ({detail})") from None
    if type(value) is dict or type(value) is list:
        _check_keys(value, depth=0, limits=limits)
    return value


def _check_keys(value: object, *, depth: int, limits: Limits) -> None:
    """Refuse a map key that is not a string, or nesting deeper than the limits allow."""
    if depth >= limits.max_depth:
        raise EnvelopeError(f"nested more than {limits.max_depth} deep")
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict) and not all(type(key) is str for key in value):
        raise EnvelopeError("a map key is not a string")
    for item in items:  # type: ignore[union-attr]
        if type(item) is dict or type(item) is list:
            _check_keys(item, depth=depth + 1, limits=limits)


class _Reader:
    def __init__(self, view: memoryview, limits: Limits) -> None:
        self._view = view
        self._limits = limits
        self._values_left = limits.max_values
        self.pos = 0

    def value(self, *, depth: int) -> object:
        self._values_left -= 1
        if self._values_left < 0:
            raise EnvelopeError(f"more than {self._limits.max_values} values")
        if self.pos >= len(self._view):
            raise EnvelopeError(f"payload ends at {self.pos}, where a value should start")
        tag = self._view[self.pos]
        self.pos += 1

        if tag <= 0x7F:
            return tag
        if tag >= 0xE0:
            return tag - 0x100
        if 0xA0 <= tag <= 0xBF:
            return self._str(tag & 0x1F)
        if 0x90 <= tag <= 0x9F:
            return self._array(tag & 0x0F, depth=depth)
        if 0x80 <= tag <= 0x8F:
            return self._map(tag & 0x0F, depth=depth)
        if tag in _CONSTANTS:
            return _CONSTANTS[tag]
        return self._tagged(tag, depth=depth)

    def _tagged(self, tag: int, *, depth: int) -> object:
        known = _TAGS.get(tag)
        if known is None:
            raise EnvelopeError(f"type byte 0x{tag:02x} at {self.pos - 1} is not allowed")
        kind, layout = known
        (argument,) = layout.unpack(self._take(layout.size))

        if kind in ("int", "float"):
            return argument
        if kind == "bin":
            return self._bin(argument)
        if kind == "str":
            return self._str(argument)
        if kind == "array":
            return self._array(argument, depth=depth)
        return self._map(argument, depth=depth)

    def _bin(self, length: int) -> memoryview:
        if length > self._limits.max_bin_len:
            raise EnvelopeError(f"binary of {length} bytes exceeds {self._limits.max_bin_len}")
        return self._take(length)

    def _str(self, length: int) -> str:
        if length > self._limits.max_str_len:
            raise EnvelopeError(f"string of {length} bytes exceeds {self._limits.max_str_len}")
        raw = self._take(length)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"string at {self.pos - length} is not UTF-8") from exc

    def _array(self, length: int, *, depth: int) -> list[object]:
        if length > self._limits.max_array_len:
            raise EnvelopeError(f"array of {length} items exceeds {self._limits.max_array_len}")
        self._check_room(length, depth=depth)  # every item takes at least one byte
        return [self.value(depth=depth + 1) for _ in range(length)]

    def _map(self, length: int, *, depth: int) -> dict[str, object]:
        if length > self._limits.max_map_len:
            raise EnvelopeError(f"map of {length} entries exceeds {self._limits.max_map_len}")
        self._check_room(2 * length, depth=depth)

        out: dict[str, object] = {}
        for _ in range(length):
            key = self.value(depth=depth + 1)
            if not isinstance(key, str):
                raise EnvelopeError(f"map key {type(key).__name__} at {self.pos} is not a string")
            out[key] = self.value(depth=depth + 1)
        return out

    def _check_room(self, items: int, *, depth: int) -> None:
        if depth >= self._limits.max_depth:
            raise EnvelopeError(f"nested more than {self._limits.max_depth} deep")
        if items > len(self._view) - self.pos:
            raise EnvelopeError(
                f"{items} items cannot fit in the {len(self._view) - self.pos} bytes left"
            )

    def _take(self, length: int) -> memoryview:
        end = self.pos + length
        if end > len(self._view):
            raise EnvelopeError(f"payload ends at {len(self._view)}, inside a value at {self.pos}")
        piece = self._view[self.pos : end]
        self.pos = end
        return piece
