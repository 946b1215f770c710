"""The update codec: a msgpack envelope of named tensors, each blosc2-compressed.

Layout of an encoded payload (msgpack map)::

    {"format": "fedq.tensors", "version": 1,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...],
                  "compression": "blosc2" | "raw", "nbytes": int, "data": bytes}]}

Decoding trusts nothing: the envelope is parsed with msgpack's size limits, every
declared size is checked against the caller's bound *before* anything is
decompressed (blosc2's header states the decompressed size), and the result must
match the declared dtype and shape. No pickle is involved anywhere.

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

import blosc2
import msgpack
import numpy as np

from fedq.tensors import ModelSpec, TensorSpec

__all__ = [
    "CODECS",
    "CodecError",
    "decode_tensors",
    "encode_tensors",
    "iter_tensors",
    "validate_tensor",
    "validate_update",
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


class CodecError(ValueError):
    """An encoded payload is malformed, oversized or does not match the model."""


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
    payload: bytes, *, max_bytes: int, expected: ModelSpec | None = None
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
    envelope = _unpack_envelope(payload)

    known = {t.name: t for t in expected.trainable} if expected is not None else None
    seen: set[str] = set()
    budget = max_bytes
    for index, record in enumerate(envelope["tensors"]):
        name, array = _decode_record(record, index=index, budget=budget, known=known)
        if name in seen:
            raise CodecError(f"tensor {name!r} appears twice")
        seen.add(name)
        budget -= array.nbytes
        yield name, array


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
    expected = {t.name: t for t in spec.trainable}
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
        part = flat[start : start + _CHUNK]
        if not np.isfinite(part).all():
            raise CodecError(f"tensor {name!r} holds NaN or Inf values")
        peak = float(np.abs(part).max())
        if peak > max_abs_value:
            raise CodecError(
                f"tensor {name!r}: |value| {peak:.3g} exceeds the bound {max_abs_value:g}"
            )


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


def _dequantize(data: bytes, record: dict[str, object], *, name: str, out: np.ndarray) -> None:
    """Fill ``out`` (flat, declared dtype) from a q8 record's data, checking it first."""
    block = record.get("block")
    if not isinstance(block, int) or not _Q8_BLOCKS[0] <= block <= _Q8_BLOCKS[1]:
        raise CodecError(f"tensor {name!r}: q8 block {block!r} is not in {list(_Q8_BLOCKS)}")
    blocks = -(-out.size // block)
    raw = _decompress(data, "blosc2", nbytes=8 * blocks + out.size, name=name)

    los = np.frombuffer(raw, np.float32, count=blocks)
    scales = np.frombuffer(raw, np.float32, count=blocks, offset=4 * blocks)
    codes = np.frombuffer(raw, np.uint8, offset=8 * blocks)
    if not (np.isfinite(los).all() and np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError(f"tensor {name!r}: q8 block minimum or scale is not a finite number")

    step = max(block, _CHUNK - _CHUNK % block)
    for start in range(0, out.size, step):
        c = codes[start : start + step]
        first, full = start // block, c.size // block
        blocks_of = slice(first, first + full)
        values = c[: full * block].reshape(full, block) * scales[blocks_of, None]
        values += los[blocks_of, None]
        out[start : start + full * block] = values.reshape(-1)
        if c.size % block:  # the tensor's last, partial block
            tail = c[full * block :] * scales[first + full] + los[first + full]
            out[start + full * block : start + c.size] = tail


def _unpack_envelope(payload: bytes | bytearray) -> dict[str, object]:
    limit = len(payload)
    try:
        envelope = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=min(limit, 1 << 16),
            max_array_len=min(limit, 1 << 20),
            max_map_len=64,
        )
    except Exception as exc:  # msgpack raises many unrelated types on bad input
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


def _decode_record(
    record: object, *, index: int, budget: int, known: dict[str, TensorSpec] | None
) -> tuple[str, np.ndarray]:
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
    if not isinstance(data, bytes) or not isinstance(nbytes, int):
        raise CodecError(f"tensor {name!r}: data or nbytes missing")

    if known is not None:
        _check_declared(name, dtype, shape, known)

    expected = math.prod(shape) * np.dtype(dtype).itemsize  # exact: Python ints
    if nbytes != expected:
        raise CodecError(f"tensor {name!r}: nbytes {nbytes} but shape and dtype need {expected}")
    if nbytes > budget:
        raise CodecError(f"tensor {name!r}: {nbytes} bytes exceed the remaining bound {budget}")

    out = np.empty(shape, dtype=np.dtype(dtype))
    if compression == "q8":
        if np.dtype(dtype).kind != "f":
            raise CodecError(f"tensor {name!r}: q8 holds float tensors only, not {dtype}")
        _dequantize(data, record, name=name, out=out.reshape(-1))
    elif compression == "blosc2" and nbytes:
        _decompress(data, compression, nbytes=nbytes, name=name, into=out)
    else:
        raw = _decompress(data, compression, nbytes=nbytes, name=name)
        out.reshape(-1)[...] = np.frombuffer(raw, dtype=np.dtype(dtype))
    return name, out


def _is_shape(shape: object) -> bool:
    """A list of at most ``_MAX_DIMS`` sizes whose non-zero product numpy can index."""
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        return False
    if not all(type(d) is int and d >= 0 for d in shape):  # bool is an int, and no size
        return False
    return math.prod(d for d in shape if d) <= _MAX_ELEMENTS


def _check_declared(name: str, dtype: str, shape: list[int], known: dict[str, TensorSpec]) -> None:
    spec = known.get(name)
    if spec is None:
        raise CodecError(f"update has tensor {name!r} that the model does not have")
    if tuple(shape) != spec.shape:
        raise CodecError(f"tensor {name!r}: shape {shape}, model has {list(spec.shape)}")
    if dtype != spec.dtype:
        raise CodecError(f"tensor {name!r}: dtype {dtype}, model has {spec.dtype}")


def _decompress(
    data: bytes, compression: str, *, nbytes: int, name: str, into: np.ndarray | None = None
) -> bytes:
    if compression == "raw" or nbytes == 0:
        if len(data) != nbytes:
            raise CodecError(f"tensor {name!r}: {len(data)} data bytes, expected {nbytes}")
        return data

    try:
        declared, _cbytes, _block = blosc2.get_cbuffer_sizes(data)
    except Exception as exc:
        raise CodecError(f"tensor {name!r}: not a blosc2 frame ({exc})") from exc
    if declared != nbytes:
        raise CodecError(f"tensor {name!r}: blosc2 frame holds {declared} bytes, expected {nbytes}")

    try:
        if into is not None:  # straight into the caller's array: no intermediate copy
            blosc2.decompress2(data, dst=into)
            return b""
        raw = blosc2.decompress2(data)
    except Exception as exc:
        raise CodecError(f"tensor {name!r}: blosc2 data is corrupt ({exc})") from exc
    if len(raw) != nbytes:
        raise CodecError(f"tensor {name!r}: decompressed to {len(raw)} bytes, expected {nbytes}")
    return bytes(raw)
