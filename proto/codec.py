"""The update codec: a msgpack envelope of named tensors, each blosc2-compressed.

Layout of an encoded payload (msgpack map)::

    {"format": "fedq.tensors", "version": 1,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...],
                  "compression": "blosc2" | "raw", "nbytes": int, "data": bytes}]}

Decoding trusts nothing: the envelope is parsed with msgpack's size limits, every
declared size is checked against the caller's bound *before* anything is
decompressed (blosc2's header states the decompressed size), and the result must
match the declared dtype and shape. No pickle is involved anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import blosc2
import msgpack
import numpy as np

from fedq.tensors import ModelSpec, TensorSpec

__all__ = [
    "CODECS",
    "CodecError",
    "decode_tensors",
    "encode_tensors",
    "validate_update",
]

FORMAT = "fedq.tensors"
VERSION = 1
CODECS = ("blosc2", "raw")
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8"})
_BLOSC2_LEVEL = 1  # higher zstd levels compress DP-noised floats no better, only slower


class CodecError(ValueError):
    """An encoded payload is malformed, oversized or does not match the model."""


def encode_tensors(tensors: Mapping[str, np.ndarray], *, codec: str = "blosc2") -> bytes:
    """Encode named arrays into one payload with the given codec."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")

    records = []
    for name, array in tensors.items():
        a = np.asarray(array)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        if str(a.dtype) not in ALLOWED_DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {a.dtype} cannot be encoded")
        records.append(
            {
                "name": name,
                "dtype": str(a.dtype),
                "shape": list(a.shape),
                "compression": codec,
                "nbytes": a.nbytes,
                "data": _compress(a, codec),
            }
        )

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
    envelope = _unpack_envelope(payload)

    known = {t.name: t for t in expected.trainable} if expected is not None else None
    out: dict[str, np.ndarray] = {}
    budget = max_bytes
    for index, record in enumerate(envelope["tensors"]):
        name, array = _decode_record(record, index=index, budget=budget, known=known)
        if name in out:
            raise CodecError(f"tensor {name!r} appears twice")
        budget -= array.nbytes
        out[name] = array
    return out


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
        a = tensors[name]
        if tuple(a.shape) != t.shape:
            raise CodecError(f"tensor {name!r}: shape {list(a.shape)}, model has {list(t.shape)}")
        if str(a.dtype) != t.dtype:
            raise CodecError(f"tensor {name!r}: dtype {a.dtype}, model has {t.dtype}")
        if not np.isfinite(a).all():
            raise CodecError(f"tensor {name!r} holds NaN or Inf values")
        peak = float(np.abs(a).max()) if a.size else 0.0
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


def _unpack_envelope(payload: bytes) -> dict[str, object]:
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
    if dtype not in ALLOWED_DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if compression not in CODECS:
        raise CodecError(f"tensor {name!r}: compression {compression!r} is unknown")
    if not isinstance(data, bytes) or not isinstance(nbytes, int):
        raise CodecError(f"tensor {name!r}: data or nbytes missing")

    if known is not None:
        _check_declared(name, dtype, shape, known)

    expected = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if nbytes != expected:
        raise CodecError(f"tensor {name!r}: nbytes {nbytes} but shape and dtype need {expected}")
    if nbytes > budget:
        raise CodecError(f"tensor {name!r}: {nbytes} bytes exceed the remaining bound {budget}")

    raw = _decompress(data, compression, nbytes=nbytes, name=name)
    return name, np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


def _check_declared(name: str, dtype: str, shape: list[int], known: dict[str, TensorSpec]) -> None:
    spec = known.get(name)
    if spec is None:
        raise CodecError(f"update has tensor {name!r} that the model does not have")
    if tuple(shape) != spec.shape:
        raise CodecError(f"tensor {name!r}: shape {shape}, model has {list(spec.shape)}")
    if dtype != spec.dtype:
        raise CodecError(f"tensor {name!r}: dtype {dtype}, model has {spec.dtype}")


def _decompress(data: bytes, compression: str, *, nbytes: int, name: str) -> bytes:
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
        raw = blosc2.decompress2(data)
    except Exception as exc:
        raise CodecError(f"tensor {name!r}: blosc2 data is corrupt ({exc})") from exc
    if len(raw) != nbytes:
        raise CodecError(f"tensor {name!r}: decompressed to {len(raw)} bytes, expected {nbytes}")
    return bytes(raw)
