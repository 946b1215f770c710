"""The q8 codec: bounded error, unbiased rounding, and refusal of malformed frames."""

from __future__ import annotations

import blosc2
import msgpack
import numpy as np
import pytest

from fedq.tensors import ModelSpec
from proto.codec import (
    Q8_BLOCK,
    CodecError,
    check_update,
    decode_tensors,
    encode_tensors,
    iter_slices,
    validate_values,
)


def _update(size: int = 3 * Q8_BLOCK + 123, *, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal(size) * 0.02).astype(np.float32),
        "b": rng.uniform(-1, 1, (7, 5)).astype(np.float32),
        "steps": np.array(12, dtype=np.int64),
    }


def _block_scales(x: np.ndarray) -> np.ndarray:
    """Per-value scale of the block each value falls in."""
    flat = x.reshape(-1).astype(np.float32)
    scales = np.empty_like(flat)
    for start in range(0, flat.size, Q8_BLOCK):
        block = flat[start : start + Q8_BLOCK]
        scales[start : start + Q8_BLOCK] = (block.max() - block.min()) / np.float32(255)
    return scales.reshape(x.shape)


def _envelope(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


def _q8_record(**changes: object) -> bytes:
    envelope = _envelope(encode_tensors({"w": np.arange(10, dtype=np.float32)}, codec="q8"))
    envelope["tensors"][0].update(changes)
    return msgpack.packb(envelope)


def test_a_q8_round_trip_keeps_dtypes_shapes_and_each_error_within_one_scale():
    update = _update()

    decoded = decode_tensors(
        encode_tensors(update, codec="q8", rng=np.random.default_rng(1)), max_bytes=1 << 20
    )

    for name, original in update.items():
        assert decoded[name].dtype == original.dtype and decoded[name].shape == original.shape
    assert np.array_equal(decoded["steps"], update["steps"])
    for name in ("w", "b"):
        error = np.abs(decoded[name].astype(np.float64) - update[name])
        assert np.all(error <= _block_scales(update[name]) * (1 + 1e-5) + 1e-12)


def test_q8_rounding_is_unbiased_and_its_variance_is_within_a_quarter_scale_squared():
    x = {"w": np.random.default_rng(3).uniform(-0.5, 0.5, Q8_BLOCK).astype(np.float32)}
    rng = np.random.default_rng(7)
    trials = 400

    decoded = np.stack(
        [
            decode_tensors(encode_tensors(x, codec="q8", rng=rng), max_bytes=1 << 20)["w"]
            for _ in range(trials)
        ]
    ).astype(np.float64)

    scale = float(_block_scales(x["w"])[0])
    error = decoded - x["w"]
    # The mean error over trials and values has standard deviation <= scale/2/sqrt(n).
    bound = scale / 2 / np.sqrt(trials * x["w"].size)
    assert abs(error.mean()) < 5 * bound
    per_value_mean = error.mean(axis=0)
    assert np.all(np.abs(per_value_mean) < 5 * scale / 2 / np.sqrt(trials))
    assert np.all(error.var(axis=0) <= scale**2 / 4 * 1.35)


def test_q8_is_several_times_smaller_than_lossless_on_gaussian_noise():
    update = {"w": (np.random.default_rng(0).standard_normal(200_000) * 0.01).astype(np.float32)}

    lossless = len(encode_tensors(update, codec="blosc2"))
    quantised = len(encode_tensors(update, codec="q8", rng=np.random.default_rng(0)))

    assert quantised * 3.5 < lossless


def test_a_constant_tensor_survives_q8_exactly():
    update = {"w": np.full(5000, 0.25, dtype=np.float32)}

    decoded = decode_tensors(encode_tensors(update, codec="q8"), max_bytes=1 << 20)

    assert np.array_equal(decoded["w"], update["w"])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_encoded_as_q8_is_refused_by_the_decoder(value):
    payload = encode_tensors({"w": np.array([1.0, value, 2.0], dtype=np.float32)}, codec="q8")

    with pytest.raises(CodecError, match="finite"):
        decode_tensors(payload, max_bytes=1 << 20)


def _frame(raw: bytes) -> bytes:
    return bytes(blosc2.compress2(raw, typesize=1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"block": 3}, "block"),
        ({"block": "4096"}, "block"),
        ({"data": b"not a frame"}, "blosc2"),
        ({"data": _frame(b"\0" * 17)}, "holds 17 bytes"),
        ({"data": _frame(np.array([np.nan, 1], np.float32).tobytes() + b"\0" * 10)}, "finite"),
        ({"data": _frame(np.array([0, -1], np.float32).tobytes() + b"\0" * 10)}, "finite"),
        ({"dtype": "int64", "nbytes": 80}, "float tensors only"),
        ({"nbytes": 1 << 30}, "nbytes"),
    ],
    ids=[
        "tiny-block",
        "block-type",
        "not-blosc2",
        "wrong-size",
        "nan-lo",
        "negative-scale",
        "int-dtype",
        "nbytes",
    ],
)
def test_malformed_q8_records_are_refused(changes, message):
    with pytest.raises(CodecError, match=message):
        decode_tensors(_q8_record(**changes), max_bytes=1 << 20)


def test_a_q8_tensor_beyond_the_byte_bound_is_refused_before_decompressing():
    payload = encode_tensors({"w": np.zeros(100_000, np.float32) + 1}, codec="q8")

    with pytest.raises(CodecError, match="exceed"):
        decode_tensors(payload, max_bytes=1000)


def _verdict(check, payload: bytes, spec: ModelSpec, bound: float) -> str:
    try:
        check(payload, spec, max_abs_value=bound)
    except CodecError as exc:
        return f"refused: {exc}"
    return "accepted"


def _check_decoded(payload: bytes, spec: ModelSpec, *, max_abs_value: float) -> None:
    for name, _offset, values in iter_slices(payload, max_bytes=spec.update_nbytes, expected=spec):
        validate_values(name, values, max_abs_value=max_abs_value)


@pytest.mark.parametrize("seed", range(4))
def test_checking_q8_bounds_gives_the_verdict_of_checking_every_decoded_value(seed):
    update = {name: a for name, a in _update(seed=seed).items() if a.dtype.kind == "f"}
    spec = ModelSpec.from_arrays(update)
    payload = encode_tensors(update, codec="q8", rng=np.random.default_rng(seed))
    decoded = decode_tensors(payload, max_bytes=spec.update_nbytes)
    peak = max(float(np.abs(a).max()) for a in decoded.values())

    # Around the largest decoded value, where the block bounds and the values part ways.
    for bound in [peak * 0.5, np.nextafter(peak, 0), peak, np.nextafter(peak, 2 * peak), 12.0]:
        fast = _verdict(check_update, payload, spec, bound)
        assert fast == _verdict(_check_decoded, payload, spec, bound), bound
        assert fast.startswith("accepted" if bound >= peak else "refused")


def test_checking_an_update_refuses_missing_tensors_and_corrupt_codes():
    # More than 4 MiB of codes: lo and scale are read apart from them, as slices.
    update = {"w": np.linspace(-1, 1, 5 << 20, dtype=np.float32), "b": np.ones(3, np.float32)}
    spec = ModelSpec.from_arrays(update)
    envelope = _envelope(encode_tensors(update, codec="q8"))

    only_w = dict(envelope, tensors=[t for t in envelope["tensors"] if t["name"] == "w"])
    with pytest.raises(CodecError, match="lacks tensors"):
        check_update(msgpack.packb(only_w), spec, max_abs_value=10)

    # The bounds pass, but the last codes do not decompress.
    record = next(t for t in envelope["tensors"] if t["name"] == "w")
    record["data"] = record["data"][:-5] + b"\xff" * 4 + record["data"][-1:]
    corrupt = msgpack.packb(envelope)
    with pytest.raises(CodecError, match="corrupt"):
        decode_tensors(corrupt, max_bytes=spec.update_nbytes)
    with pytest.raises(CodecError, match="corrupt"):
        check_update(corrupt, spec, max_abs_value=10)
