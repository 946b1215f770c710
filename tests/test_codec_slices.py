"""Decoding a slice at a time: the same values as whole tensors, and the same refusals."""

from __future__ import annotations

import blosc2
import msgpack
import numpy as np
import pytest

from fedq.state.partials import add_fixed_point, to_fixed_point
from fedq.tensors import ModelSpec
from proto.codec import (
    CODECS,
    Q8_BLOCK,
    CodecError,
    decode_tensors,
    encode_tensors,
    iter_slices,
    validate_values,
)

# Above 4 MiB compressed or not, so that both ways of reading a frame are used.
BIG = 1_500_007
HUGE_Q8 = 4_500_001
MAX_BYTES = 1 << 30


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big": (rng.standard_normal(BIG) * 0.02).astype(np.float32),
        "half": (rng.standard_normal((301, 1001)) * 0.1).astype(np.float16),
        "wide": rng.standard_normal((3, 7)),
        "steps": np.array(12, dtype=np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "counts": np.arange(70_000, dtype=np.int32),
    }


def _slices_by_tensor(payload: bytes, **kwargs: object) -> dict[str, list[tuple[int, np.ndarray]]]:
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, offset, values in iter_slices(payload, max_bytes=MAX_BYTES, **kwargs):
        out.setdefault(name, []).append((offset, values.copy()))
    return out


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("slice_values", [1000, Q8_BLOCK, 1 << 20, 10_000_000])
def test_slices_hold_exactly_the_values_of_the_whole_tensors(codec, slice_values):
    payload = encode_tensors(_update(), codec=codec, rng=np.random.default_rng(1))
    whole = decode_tensors(payload, max_bytes=MAX_BYTES)

    sliced = _slices_by_tensor(payload, slice_values=slice_values)

    assert list(sliced) == list(whole)
    for name, array in whole.items():
        offsets = [offset for offset, _ in sliced[name]]
        pieces = [values for _, values in sliced[name]]
        assert offsets == list(np.cumsum([0] + [p.size for p in pieces[:-1]]))
        assert all(p.dtype == array.dtype and p.ndim == 1 for p in pieces)
        assert np.concatenate(pieces).tobytes() == array.tobytes()


@pytest.mark.parametrize("codec", ["raw", "blosc2"])
def test_lossless_slices_are_at_most_the_slice_length(codec):
    payload = encode_tensors(_update(), codec=codec)

    sliced = _slices_by_tensor(payload, slice_values=300_000)

    sizes = [values.size for _, values in sliced["big"]]
    assert sizes == [300_000] * 5 + [BIG - 5 * 300_000]


def test_q8_slices_are_whole_blocks_and_a_large_frame_is_read_in_pieces():
    x = (np.random.default_rng(2).standard_normal(HUGE_Q8) * 0.02).astype(np.float32)
    payload = encode_tensors({"x": x}, codec="q8", rng=np.random.default_rng(3))
    whole = decode_tensors(payload, max_bytes=MAX_BYTES)["x"]

    sliced = _slices_by_tensor(payload, slice_values=1_000_000)

    sizes = [values.size for _, values in sliced["x"]]
    assert all(size % Q8_BLOCK == 0 for size in sizes[:-1])
    assert np.concatenate([v for _, v in sliced["x"]]).tobytes() == whole.tobytes()


def test_a_tensor_without_values_comes_as_one_empty_slice():
    payload = encode_tensors(_update(), codec="q8")

    sliced = _slices_by_tensor(payload)

    assert [(offset, values.shape) for offset, values in sliced["empty"]] == [(0, (0,))]


def test_slices_of_a_raw_payload_are_read_only():
    payload = bytearray(encode_tensors(_update(), codec="raw"))

    for _, _, values in iter_slices(payload, max_bytes=MAX_BYTES):
        assert not values.flags.writeable


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("value", [np.nan, np.inf, 5e3])
def test_a_bad_value_in_a_late_slice_is_still_refused(codec, value):
    update = _update()
    update["big"][BIG - 3] = value
    payload = encode_tensors(update, codec=codec)

    checked = 0
    with pytest.raises(CodecError, match="'big'"):
        for name, _, values in iter_slices(payload, max_bytes=MAX_BYTES, slice_values=100_000):
            validate_values(name, values, max_abs_value=1e3)
            checked += 1

    # NaN and Inf in q8 spoil the block's lo or scale, which are checked before any slice.
    refused_up_front = codec == "q8" and not np.isfinite(value)
    assert checked == 0 if refused_up_front else checked >= BIG // 100_000


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("value", [np.nan, np.inf, 5e3, -5e3])
def test_slices_checked_against_a_bound_refuse_a_bad_value_before_yielding_it(codec, value):
    update = {name: a for name, a in _update().items() if a.dtype.kind == "f"}
    update["big"][BIG - 3] = value
    payload = encode_tensors(update, codec=codec)

    slices = iter_slices(payload, max_bytes=MAX_BYTES, slice_values=100_000, max_abs_value=1e3)
    with pytest.raises(CodecError, match="'big'"):
        for name, _, values in slices:
            assert name != "big" or np.abs(values).max() <= 1e3  # a bad slice never comes out

    update["big"][BIG - 3] = 0.5
    good = encode_tensors(update, codec=codec)
    checked = list(iter_slices(good, max_bytes=MAX_BYTES, slice_values=100_000, max_abs_value=1e3))
    assert sum(values.size for name, _, values in checked if name == "big") >= BIG


@pytest.mark.parametrize("codec", CODECS)
def test_a_fixed_point_sum_built_from_slices_equals_the_whole_update(codec):
    update = {k: v for k, v in _update().items() if v.dtype.kind == "f"}
    payload = encode_tensors(update, codec=codec, rng=np.random.default_rng(4))
    spec = ModelSpec.from_arrays(update)
    flat = spec.flatten_update(decode_tensors(payload, max_bytes=MAX_BYTES))
    starts = np.cumsum([0] + [t.size for t in spec.trainable])
    offsets = {t.name: int(start) for t, start in zip(spec.trainable, starts, strict=False)}

    total = np.zeros(spec.update_size, np.int64)
    for name, offset, values in iter_slices(
        payload, max_bytes=MAX_BYTES, expected=spec, slice_values=77_777
    ):
        begin = offsets[name] + offset
        add_fixed_point(total[begin : begin + values.size], values, 37)

    assert np.array_equal(total, to_fixed_point(flat, 37))


def _with_data(payload: bytes, name: str, data: bytes) -> bytes:
    envelope = msgpack.unpackb(payload)
    for record in envelope["tensors"]:
        if record["name"] == name:
            record["data"] = data
    return msgpack.packb(envelope)


def test_a_blosc2_frame_with_another_item_size_than_its_dtype_is_refused():
    update = _update()
    payload = encode_tensors(update, codec="blosc2")
    frame = bytes(blosc2.compress2(update["big"].tobytes(), typesize=8))

    with pytest.raises(CodecError, match="item size 8, expected 4"):
        list(iter_slices(_with_data(payload, "big", frame), max_bytes=MAX_BYTES))


def test_a_blosc2_frame_shorter_than_its_header_says_is_refused():
    update = _update()
    payload = encode_tensors(update, codec="blosc2")
    frame = bytes(blosc2.compress2(update["big"].tobytes(), typesize=4))

    with pytest.raises(CodecError, match="its header says"):
        list(iter_slices(_with_data(payload, "big", frame[:-100]), max_bytes=MAX_BYTES))
