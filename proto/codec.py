"""The update codec: a msgpack envelope of named tensors, each blosc2-compressed.

Layout of an encoded payload (msgpack map)::

    {"format": "fedq.tensors", "version": 1,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...],
                  "compression": "blosc2" | "raw", "nbytes": int, "data": bytes}]}

Decoding trusts nothing: the envelope is parsed with size limits (the binary fields
of a payload over 4 MiB stay in it as views, see ``proto._envelope``), every declared
size is checked against the caller's bound *before* anything is decompressed (blosc2's
header states the decompressed size), and the result must match the declared dtype
and shape. No pickle is involved anywhere. ``iter_slices`` decodes a tensor a slice
at a time, so a consumer that folds the values into its own buffer never holds a
whole decoded tensor.

Codecs. ``blosc2`` (zstd level 1 with byte shuffle) and ``raw`` are lossless.
``q8`` is lossy: every float tensor is cut into blocks of ``Q8_BLOCK`` values; a
block with minimum ``lo`` and maximum ``hi`` is stored as ``lo`` and
``scale = (hi - lo) / 255`` (float32) and one uint8 code per value,
``code = floor((x - lo) / scale + U)`` with ``U`` uniform on [0, 1) (stochastic
rounding), and the whole record is then compressed with zstd level 1 via blosc2.
Decoding gives ``lo + code * scale`` in the declared dtype. The rounding is
unbiased, ``E[decoded] = x``, and each value's error is independent with variance
``p (1 - p) scale**2 <= scale**2 / 4`` (``p`` is the fractional part of
``(x - lo) / scale``), so the error of a sum of ``k`` updates grows like ``sqrt(k)``
while the sum itself is unbiased. The values are quantised as float32, so the
statement holds up to float32 rounding of ``x`` (relative 6e-8). Non-float tensors
in a q8 payload are stored losslessly (blosc2). A q8 record carries ``block``;
decoding checks the block size, that the stored frame holds exactly
``8 * blocks + values`` bytes before decompressing, and that every ``lo`` and
``scale`` is finite (and ``scale >= 0``). Encoding a NaN or Inf yields a block
whose ``lo`` or ``scale`` is not finite, so the decoder refuses the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import blosc2
import msgpack
import numpy as np

from fedq.tensors import ModelSpec, TensorSpec
from proto._envelope import EnvelopeError, Limits, unpack, unpack_copying
from proto._errors import CodecError
from proto._frame import Frame

__all__ = [
    "CODECS",
    "SLICE_VALUES",
    "SMALL_PAYLOAD_BYTES",
    "CodecError",
    "TensorSlice",
    "decode_tensors",
    "encode_tensors",
    "iter_slices",
    "iter_tensors",
    "check_update",
    "validate_tensor",
    "validate_update",
    "validate_values",
]

FORMAT = "fedq.tensors"
VERSION = 1
CODECS = ("blosc2", "raw", "q8")
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8"})
_MAX_DIMS = 32  # numpy allows 64; no model tensor comes near either
# numpy needs the bytes of the non-zero dims to fit int64, even for an array with a 0 dim.
_MAX_ELEMENTS = 1 << 59
_BLOSC2_LEVEL = 1  # higher zstd levels compress DP-noised floats no better, only slower
Q8_BLOCK = 4096
_Q8_BLOCKS = (64, 1 << 20)  # block sizes a decoder accepts
_Q8_LEVELS = 255
_CHUNK = 1 << 20  # values handled at once, so that temporaries stay small
# Payloads up to this size are read by msgpack's C reader, which copies their binary
# fields; larger ones by the zero-copy reader, so a large update is never held twice.
_COPYING_READER_BYTES = 4 << 20
# Decoding a payload up to this size takes less time than handing it to a thread and
# back: services decode such payloads on their event loop, larger ones in a thread.
SMALL_PAYLOAD_BYTES = 256 * 1024
SLICE_VALUES = _CHUNK  # what iter_slices yields at once, unless told otherwise


class TensorSlice(NamedTuple):
    """Consecutive values of one tensor, flat, in its dtype, from value ``offset`` on."""

    name: str
    offset: int
    values: np.ndarray


@dataclass(frozen=True)
class _Record:
    """A tensor record whose name, dtype, shape, sizes and codec fields were checked."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    compression: str
    nbytes: int
    data: bytes | memoryview
    block: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    codec: str = "blosc2",
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encode named arrays into one payload with the given codec.

    Args:
        tensors: named arrays, in the order they are stored.
        codec: one of ``CODECS``.
        rng: source of the q8 rounding noise; ``None`` seeds one from the OS.
    """
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if codec == "q8" and rng is None:
        rng = np.random.default_rng()

    records = []
    for name, array in tensors.items():
        a = np.asarray(array)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        if str(a.dtype) not in ALLOWED_DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {a.dtype} cannot be encoded")
        record = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
        if codec == "q8" and a.dtype.kind == "f" and a.size:
            assert rng is not None
            record.update(compression="q8", nbytes=a.nbytes, block=Q8_BLOCK)
            record["data"] = _quantize(a, name=name, rng=rng)
        else:
            lossless = "blosc2" if codec == "q8" else codec
            record.update(compression=lossless, nbytes=a.nbytes, data=_compress(a, lossless))
        records.append(record)

    return msgpack.packb({"format": FORMAT, "version": VERSION, "tensors": records})


def decode_tensors(
    payload: bytes | bytearray, *, max_bytes: int, expected: ModelSpec | None = None
) -> dict[str, np.ndarray]:
    """Decode a payload, refusing one whose tensors would exceed ``max_bytes``.

    With ``expected``, each tensor's name, dtype and shape are checked against the
    model's before its data is decompressed.

    Raises:
        CodecError: with a message naming the tensor and the value that was wrong.
    """
    return dict(iter_tensors(payload, max_bytes=max_bytes, expected=expected))


def iter_tensors(
    payload: bytes | bytearray, *, max_bytes: int, expected: ModelSpec | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Decode a payload one tensor at a time, with the checks of ``decode_tensors``.

    Only one decoded tensor needs to be alive at once, so a consumer that folds each
    tensor into its own buffer holds the compressed payload plus the largest tensor.
    """
    for record in _records(payload, max_bytes=max_bytes, expected=expected):
        out = np.empty(record.shape, dtype=record.dtype)
        _decode_into(record, out.reshape(-1))
        yield record.name, out


def iter_slices(
    payload: bytes | bytearray,
    *,
    max_bytes: int,
    expected: ModelSpec | None = None,
    slice_values: int = SLICE_VALUES,
    max_abs_value: float | None = None,
) -> Iterator[TensorSlice]:
    """Decode a payload a slice at a time, with the checks of ``decode_tensors``.

    Each tensor comes as consecutive slices of ``slice_values`` values (the last one
    shorter; q8 rounds the length up to whole blocks; a tensor without values comes
    as one empty slice), in the order of the payload. A consumer that folds each
    slice into its own buffer holds the payload, one slice and, while it reads a
    compressed tensor of more than a few MiB, one copy of that tensor's compressed
    bytes. Slices may be read-only views of the payload.

    With ``max_abs_value``, every slice is also checked as ``validate_values`` checks
    it, before it is yielded; the values of a q8 tensor whose block bounds hold (see
    ``check_update``) need no check of their own.
    """
    if slice_values < 1:
        raise ValueError(f"slice_values {slice_values}: expected >= 1")
    for record in _records(payload, max_bytes=max_bytes, expected=expected):
        for offset, values in _slices(record, step=slice_values, max_abs_value=max_abs_value):
            yield TensorSlice(record.name, offset, values)


def check_update(payload: bytes | bytearray, spec: ModelSpec, *, max_abs_value: float) -> None:
    """Check an encoded update against the model without keeping any of its values.

    What ``iter_slices`` and ``validate_values`` check together: every tensor of the
    model present once, declared right, its data whole, its values finite and within
    ``max_abs_value``. A q8 tensor is bounded from its blocks' lo and scale: every
    value of a block decodes (in float32, as the decoder computes it) to between
    ``lo`` and ``lo + 255 * scale``, so when those bounds hold, its codes are only
    decompressed, never dequantized. A tensor whose bounds do not hold is decoded and
    checked value by value, so the verdict is the one the decoded values give.

    Raises:
        CodecError: naming the tensor and what was wrong.
    """
    seen = set()
    for record in _records(payload, max_bytes=spec.update_nbytes, expected=spec):
        seen.add(record.name)
        if record.compression == "q8" and record.nbytes:
            frame, los, scales = _q8_head(record)
            if _q8_within(los, scales, max_abs_value):
                _q8_codes_whole(frame, record)
                continue
        for _slice in _slices(record, step=_CHUNK, max_abs_value=max_abs_value):
            pass

    missing = sorted(spec.trainable_by_name.keys() - seen)
    if missing:
        raise CodecError(f"update lacks tensors {missing[:5]} of the model")


def _q8_within(los: np.ndarray, scales: np.ndarray, max_abs_value: float) -> bool:
    """Whether every block decodes to values within ``max_abs_value`` (float32, as decoded)."""
    tops = np.multiply(scales, np.float32(_Q8_LEVELS))
    tops += los
    return bool(-max_abs_value <= los.min() and tops.max() <= max_abs_value)


def _q8_codes_whole(frame: Frame, record: _Record) -> None:
    """Decompress a q8 record's codes, a slice at a time, to refuse a corrupt frame."""
    head = 8 * -(-record.size // record.block)
    for start in range(0, record.size, _CHUNK):
        frame.view(head + start, head + min(start + _CHUNK, record.size))


def validate_update(
    tensors: Mapping[str, np.ndarray],
    spec: ModelSpec,
    *,
    max_abs_value: float,
) -> None:
    """Check an update against the model: names, shapes, dtypes, finite and bounded.

    Raises:
        CodecError: naming the first tensor that does not fit.
    """
    expected = spec.trainable_by_name
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CodecError(f"update lacks tensors {missing[:5]} of the model")
    if extra:
        raise CodecError(f"update has tensors {extra[:5]} that the model does not have")

    for name, t in expected.items():
        validate_tensor(name, tensors[name], t, max_abs_value=max_abs_value)


def validate_tensor(name: str, a: np.ndarray, spec: TensorSpec, *, max_abs_value: float) -> None:
    """Check one tensor of an update: shape, dtype, finite and bounded.

    Raises:
        CodecError: naming the tensor and the value that does not fit.
    """
    if tuple(a.shape) != spec.shape:
        raise CodecError(f"tensor {name!r}: shape {list(a.shape)}, model has {list(spec.shape)}")
    if str(a.dtype) != spec.dtype:
        raise CodecError(f"tensor {name!r}: dtype {a.dtype}, model has {spec.dtype}")

    flat = a.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        validate_values(name, flat[start : start + _CHUNK], max_abs_value=max_abs_value)


def validate_values(name: str, values: np.ndarray, *, max_abs_value: float) -> None:
    """Check some values of tensor ``name`` (a slice): finite and ``|x| <= max_abs_value``.

    Raises:
        CodecError: naming the tensor and the value that does not fit.
    """
    if not values.size:
        return
    # min and max need no temporary array, and NaN propagates into both, so values
    # that pass this are finite and bounded; the slower checks below name the fault.
    if -max_abs_value <= values.min() and values.max() <= max_abs_value:
        return
    if not np.isfinite(values).all():
        raise CodecError(f"tensor {name!r} holds NaN or Inf values")
    peak = float(np.abs(values).max())
    raise CodecError(f"tensor {name!r}: |value| {peak:.3g} exceeds the bound {max_abs_value:g}")


def _compress(a: np.ndarray, codec: str) -> bytes:
    raw = a.tobytes()
    if codec == "raw" or not raw:
        return raw
    return bytes(
        blosc2.compress2(
            raw,
            typesize=a.dtype.itemsize,
            clevel=_BLOSC2_LEVEL,
            codec=blosc2.Codec.ZSTD,
            filters=[blosc2.Filter.SHUFFLE],
        )
    )


def _quantize(a: np.ndarray, *, name: str, rng: np.random.Generator) -> bytes:
    """q8 form of a float tensor: per-block lo and scale, one code per value, zstd."""
    flat = a.reshape(-1)
    blocks = -(-flat.size // Q8_BLOCK)
    out = np.empty(8 * blocks + flat.size, dtype=np.uint8)
    los = out[: 4 * blocks].view(np.float32)
    scales = out[4 * blocks : 8 * blocks].view(np.float32)
    codes = out[8 * blocks :]

    for start in range(0, flat.size, _CHUNK):  # _CHUNK is a multiple of Q8_BLOCK
        x = flat[start : start + _CHUNK].astype(np.float32, copy=False)
        first, used = start // Q8_BLOCK, x.size
        if used % Q8_BLOCK:  # pad the last block with its last value: same lo and hi
            x = np.concatenate([x, np.full(Q8_BLOCK - used % Q8_BLOCK, x[-1], np.float32)])
        xb = x.reshape(-1, Q8_BLOCK)
        # NOTE: a block holding NaN or Inf gets a non-finite lo or scale and garbage
        # codes; every decoder refuses such a block, so the update is refused, not hidden.
        with np.errstate(invalid="ignore", over="ignore"):
            lo = xb.min(axis=1)
            scale = (xb.max(axis=1) - lo) / np.float32(_Q8_LEVELS)
            inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)

            t = (xb - lo[:, None]) * inverse[:, None]
            t += rng.random(t.shape, dtype=np.float32)
            np.floor(t, out=t)
            np.clip(t, 0, _Q8_LEVELS, out=t)
            np.nan_to_num(t, copy=False, nan=0.0)
        los[first : first + xb.shape[0]] = lo
        scales[first : first + xb.shape[0]] = scale
        codes[start : start + used] = t.reshape(-1)[:used]

    return bytes(blosc2.compress2(out, typesize=1, clevel=_BLOSC2_LEVEL, codec=blosc2.Codec.ZSTD))


def _unpack_envelope(payload: bytes | bytearray) -> dict[str, object]:
    limit = len(payload)
    limits = Limits(
        max_bin_len=limit,
        max_str_len=min(limit, 1 << 16),
        max_array_len=min(limit, 1 << 20),
        max_map_len=64,
    )
    read = unpack_copying if limit <= _COPYING_READER_BYTES else unpack
    try:
        envelope = read(payload, limits)
    except EnvelopeError as exc:
        raise CodecError(f"payload is not a valid msgpack envelope: {exc}") from exc

    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CodecError(f"payload is not a {FORMAT} envelope")
    if envelope.get("version") != VERSION:
        raise CodecError(
            f"envelope version {envelope.get('version')!r} is not supported (want {VERSION})"
        )
    if not isinstance(envelope.get("tensors"), list):
        raise CodecError("envelope has no tensor list")
    return envelope


def _records(
    payload: bytes | bytearray, *, max_bytes: int, expected: ModelSpec | None
) -> Iterator[_Record]:
    """The payload's tensor records, each checked before it is handed on."""
    envelope = _unpack_envelope(payload)

    known = expected.trainable_by_name if expected is not None else None
    seen: set[str] = set()
    budget = max_bytes
    for index, fields in enumerate(envelope["tensors"]):
        record = _check_record(fields, index=index, budget=budget, known=known)
        if record.name in seen:
            raise CodecError(f"tensor {record.name!r} appears twice")
        seen.add(record.name)
        budget -= record.nbytes
        yield record


def _check_record(
    record: object, *, index: int, budget: int, known: Mapping[str, TensorSpec] | None
) -> _Record:
    if not isinstance(record, dict):
        raise CodecError(f"tensor #{index} is not a map")
    name, dtype, shape = record.get("name"), record.get("dtype"), record.get("shape")
    compression, nbytes, data = record.get("compression"), record.get("nbytes"), record.get("data")

    if not isinstance(name, str) or not name:
        raise CodecError(f"tensor #{index} has no name")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
    if not _is_shape(shape):
        raise CodecError(f"tensor {name!r}: shape {str(shape)[:80]} is not a list of sizes")
    if compression not in CODECS:
        raise CodecError(f"tensor {name!r}: compression {compression!r} is unknown")
    if not isinstance(data, bytes | memoryview) or not isinstance(nbytes, int):
        raise CodecError(f"tensor {name!r}: data or nbytes missing")

    if known is not None:
        _check_declared(name, dtype, shape, known)

    expected = math.prod(shape) * np.dtype(dtype).itemsize  # exact: Python ints
    if nbytes != expected:
        raise CodecError(f"tensor {name!r}: nbytes {nbytes} but shape and dtype need {expected}")
    if nbytes > budget:
        raise CodecError(f"tensor {name!r}: {nbytes} bytes exceed the remaining bound {budget}")

    block = 0
    if compression == "q8":
        if np.dtype(dtype).kind != "f":
            raise CodecError(f"tensor {name!r}: q8 holds float tensors only, not {dtype}")
        block = record.get("block")
        if not isinstance(block, int) or not _Q8_BLOCKS[0] <= block <= _Q8_BLOCKS[1]:
            raise CodecError(f"tensor {name!r}: q8 block {block!r} is not in {list(_Q8_BLOCKS)}")
    return _Record(name, np.dtype(dtype), tuple(shape), compression, nbytes, data, block)


def _decode_into(record: _Record, flat: np.ndarray) -> None:
    """Decode a whole tensor into ``flat``, its flat array in the declared dtype."""
    if record.compression == "blosc2" and record.nbytes:
        # Straight into the tensor: no intermediate copy.
        frame = Frame(
            record.data, nbytes=record.nbytes, typesize=record.dtype.itemsize, name=record.name
        )
        frame.read(0, record.nbytes, flat)
        return
    for start, values in _slices(record, step=_CHUNK):
        flat[start : start + values.size] = values


def _slices(
    record: _Record, *, step: int, max_abs_value: float | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, values) of consecutive slices of ``step`` values (q8: whole blocks).

    With ``max_abs_value``, each slice is checked by ``validate_values`` first (a q8
    record whose block bounds hold, once for all its slices).
    """
    if record.compression == "q8" and record.nbytes:
        yield from _q8_slices(record, step=step, max_abs_value=max_abs_value)
        return
    if record.compression == "blosc2" and record.nbytes:
        pieces = _blosc2_slices(record, step=step)
    else:
        values = _raw_values(record)
        pieces = (
            (start, values[start : start + step]) for start in range(0, max(values.size, 1), step)
        )
    for start, piece in pieces:
        if max_abs_value is not None:
            validate_values(record.name, piece, max_abs_value=max_abs_value)
        yield start, piece


def _raw_values(record: _Record) -> np.ndarray:
    """A raw (or empty) record's values: a read-only view of the payload."""
    if len(record.data) != record.nbytes:
        raise CodecError(
            f"tensor {record.name!r}: {len(record.data)} data bytes, expected {record.nbytes}"
        )
    values = np.frombuffer(record.data, dtype=record.dtype)
    values.flags.writeable = False
    return values


def _blosc2_slices(record: _Record, *, step: int) -> Iterator[tuple[int, np.ndarray]]:
    itemsize = record.dtype.itemsize
    frame = Frame(record.data, nbytes=record.nbytes, typesize=itemsize, name=record.name)
    for start in range(0, record.size, step):
        values = np.empty(min(step, record.size - start), record.dtype)
        frame.read(start * itemsize, start * itemsize + values.nbytes, values)
        yield start, values


def _q8_slices(
    record: _Record, *, step: int, max_abs_value: float | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Dequantized slices of a q8 record; every block's lo and scale is checked first."""
    frame, los, scales = _q8_head(record)
    block, size, head = record.block, record.size, 8 * los.size
    unchecked = max_abs_value is not None and not _q8_within(los, scales, max_abs_value)

    step = max(block, step - step % block)
    for start in range(0, size, step):
        codes = frame.view(head + start, head + min(start + step, size))
        values = _dequantize(codes, los, scales, first=start // block, block=block)
        if unchecked and max_abs_value is not None:
            validate_values(record.name, values, max_abs_value=max_abs_value)
        yield start, values.astype(record.dtype, copy=False)


def _q8_head(record: _Record) -> tuple[Frame, np.ndarray, np.ndarray]:
    """A q8 record's frame and its blocks' lo and scale, checked finite (scale >= 0)."""
    blocks = -(-record.size // record.block)
    frame = Frame(record.data, nbytes=8 * blocks + record.size, typesize=1, name=record.name)

    head = frame.view(0, 8 * blocks).view(np.float32)
    low, high = head.min(), head.max()  # NaN propagates into both
    los, scales = head[:blocks], head[blocks:]
    if not (math.isfinite(low) and math.isfinite(high) and scales.min() >= 0):
        raise CodecError(
            f"tensor {record.name!r}: q8 block minimum or scale is not a finite number"
        )
    return frame, los, scales


def _dequantize(
    codes: np.ndarray, los: np.ndarray, scales: np.ndarray, *, first: int, block: int
) -> np.ndarray:
    """``lo + code * scale`` (float32) of codes that start at block ``first``."""
    full = codes.size // block
    values = np.empty(codes.size, np.float32)
    whole = values[: full * block].reshape(full, block)
    np.multiply(
        codes[: full * block].reshape(full, block), scales[first : first + full, None], out=whole
    )
    whole += los[first : first + full, None]
    if codes.size % block:  # the tensor's last, partial block
        values[full * block :] = codes[full * block :] * scales[first + full] + los[first + full]
    return values


def _is_shape(shape: object) -> bool:
    """A list of at most ``_MAX_DIMS`` sizes whose non-zero product numpy can index."""
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        return False
    if not all(type(d) is int and d >= 0 for d in shape):  # bool is an int, and no size
        return False
    return math.prod(d for d in shape if d) <= _MAX_ELEMENTS


def _check_declared(
    name: str, dtype: str, shape: list[int], known: Mapping[str, TensorSpec]
) -> None:
    spec = known.get(name)
    if spec is None:
        raise CodecError(f"update has tensor {name!r} that the model does not have")
    if tuple(shape) != spec.shape:
        raise CodecError(f"tensor {name!r}: shape {shape}, model has {list(spec.shape)}")
    if dtype != spec.dtype:
        raise CodecError(f"tensor {name!r}: dtype {dtype}, model has {spec.dtype}")
