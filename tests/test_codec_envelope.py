"""The envelope reader: msgpack's values, binary fields as views, bounded work."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto._envelope import EnvelopeError, Limits, unpack, unpack_copying

LIMITS = Limits(max_bin_len=1 << 20, max_str_len=1 << 16, max_array_len=1 << 20, max_map_len=64)
FUZZ = settings(max_examples=300, deadline=None, database=None)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=8), inner, max_size=6),
    ),
    max_leaves=30,
)


def _plain(value: object) -> object:
    """``value`` with every memoryview turned into bytes, to compare with msgpack's."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@FUZZ
@given(value=values)
def test_what_msgpack_packs_reads_back_the_same(value):
    payload = msgpack.packb(value)

    assert _plain(unpack(payload, LIMITS)) == msgpack.unpackb(payload, raw=False)


@FUZZ
@given(payload=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_or_read_as_msgpack_reads_them(payload):
    try:
        read = unpack(payload, LIMITS)
    except EnvelopeError as exc:
        assert str(exc)
        return

    expected = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    assert msgpack.packb(_plain(read)) == msgpack.packb(expected)  # NaN != NaN, bits are equal


@FUZZ
@given(payload=st.one_of(values.map(msgpack.packb), st.binary(max_size=200)))
def test_the_copying_reader_gives_what_the_zero_copy_reader_gives(payload):
    def read(reader):
        try:
            return "read", msgpack.packb(_plain(reader(payload, LIMITS)))
        except EnvelopeError:
            return "refused", None

    assert read(unpack_copying) == read(unpack)


def test_binary_fields_are_read_only_views_of_the_payload():
    payload = bytearray(msgpack.packb({"data": b"\x01" * 1000, "more": [b"\x02" * 70_000]}))

    read = unpack(payload, LIMITS)

    for field in (read["data"], read["more"][0]):
        assert isinstance(field, memoryview) and field.readonly
        assert field.obj is payload
    assert bytes(read["more"][0]) == b"\x02" * 70_000


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (msgpack.packb({"a": 1}) + b"\x00", "follow"),
        (msgpack.packb(["abc", "def"])[:-1], "ends"),
        (msgpack.packb(msgpack.ExtType(1, b"x")), "not allowed"),
        (msgpack.packb({1: 2}), "not a string"),
        (msgpack.packb({b"k": 2}), "not a string"),
        (b"\xdd\xff\xff\xff\xff", "exceeds"),
        (b"\xdc\x0f\xff" + b"\x00" * 10, "cannot fit"),
        (b"\xc6\x00\x00\x00\x10" + b"\x00" * 10, "ends"),
        (b"\xa3\xff\xfe\xfd", "UTF-8"),
        (msgpack.packb(b"x" * 2000), "exceeds"),
        (b"\x91" * 40 + b"\x00", "nested"),
    ],
    ids=[
        "trailing",
        "truncated",
        "ext",
        "int-key",
        "bin-key",
        "array-limit",
        "array-room",
        "bin-room",
        "utf8",
        "bin-limit",
        "depth",
    ],
)
def test_malformed_or_oversized_msgpack_is_refused(payload, message):
    limits = Limits(max_bin_len=1000, max_str_len=100, max_array_len=1 << 16, max_map_len=8)

    with pytest.raises(EnvelopeError, match=message):
        unpack(payload, limits)
    with pytest.raises(EnvelopeError):  # msgpack words its own reasons
        unpack_copying(payload, limits)


def test_a_payload_of_many_small_values_is_refused_quickly():
    payload = msgpack.packb([[0] * 1000] * 1000)
    limits = Limits(
        max_bin_len=len(payload),
        max_str_len=100,
        max_array_len=1 << 20,
        max_map_len=8,
        max_values=100_000,
    )

    started = time.monotonic()
    with pytest.raises(EnvelopeError, match="more than 100000 values"):
        unpack(payload, limits)
    assert time.monotonic() - started < 1.0
