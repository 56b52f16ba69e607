import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode import codec
from ehrnode.errors import CodecError, SchemaError

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@given(values)
def test_encode_then_decode_is_identity(value):
    assert codec.decode(codec.encode(value)) == value


@given(values)
def test_encoding_is_canonical_whatever_the_map_order(value):
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert codec.encode(reordered) == codec.encode(value)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_decoding_random_bytes_raises_only_codec_error(data):
    try:
        codec.decode(data)
    except CodecError:
        pass


def _by_encoding_again(data):
    """What strict decoding means, said the slow way: ``[value]`` if ``data`` is exactly the
    canonical encoding of a value of the data model, else None."""
    try:
        value = cbor2.loads(data)
    except Exception:  # noqa: BLE001 - anything cbor2 cannot read is refused either way
        return None
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return None
            stack.extend(item.values())
        elif isinstance(item, int) and not -(2**64) <= item < 2**64:
            return None  # a bignum: a tag, which the data model has not
        elif not isinstance(item, (int, bytes, str, bool, type(None))):
            return None
    try:
        again = cbor2.dumps(value, canonical=True)
    except Exception:  # noqa: BLE001
        return None
    return [value] if again == data else None


@given(values, st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
@settings(max_examples=3000)
def test_decode_accepts_exactly_the_canonical_encodings_of_the_data_model(value, edits):
    """The header scan stands in for encoding the value again: on encodings and on encodings
    with bytes changed, inserted or deleted, both accept the same inputs, to the same value."""
    data = bytearray(codec.encode(value))
    for op, where, byte in edits:
        where %= len(data) + 1
        if op == 0 and where < len(data):
            data[where] = byte
        elif op == 1:
            data.insert(where, byte)
        elif where < len(data):
            del data[where]
    expected = _by_encoding_again(bytes(data))
    try:
        got = codec.decode(bytes(data))
    except CodecError:
        assert expected is None
    else:
        assert expected is not None and got == expected[0] and type(got) is type(expected[0])


@pytest.mark.parametrize("data", [
    b"\xa2\x61\x61\x01\x61\x62\x02",  # {"a": 1, "b": 2}
    b"\xa2\x61\x62\x01\x62\x61\x61\x02",  # {"b": 1, "aa": 2}: the shorter key first
    b"\x18\x18", b"\x19\x01\x00", b"\x1a\x00\x01\x00\x00", b"\x1b\x00\x00\x00\x01\x00\x00\x00\x00",
    b"\x38\x18", b"\x58\x18" + b"x" * 24, b"\x98\x18" + b"\x00" * 24, b"\xf4", b"\xf5", b"\xf6",
])
def test_decode_accepts_canonical_edge_cases(data):
    assert codec.decode(data) == cbor2.loads(data)


@pytest.mark.parametrize("data", [
    b"\x19\x00\xff", b"\x1a\x00\x00\xff\xff", b"\x1b\x00\x00\x00\x00\xff\xff\xff\xff",  # longer than needed
    b"\x38\x17", b"\x58\x01x", b"\x78\x01x", b"\x98\x01\x00", b"\xb8\x01\x61\x61\x00",
    b"\xa1\x78\x01\x61\x00",  # a key whose length is not in its shortest form
    b"\xa2\x62\x61\x61\x01\x61\x62\x02",  # {"aa": 1, "b": 2}: the longer key first
])
def test_decode_refuses_arguments_and_keys_not_in_canonical_form(data):
    with pytest.raises(CodecError) as err:
        codec.decode(data)
    assert err.value.reason == "not_canonical"
    assert _by_encoding_again(data) is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x01\x02", "trailing_bytes"),
        (b"\xa2\x61\x61\x01\x61\x61\x02", "malformed"),  # duplicate key "a"
        (b"\x9f\x01\xff", "malformed"),  # indefinite-length array
        (b"\x18\x01", "not_canonical"),  # 1 in two bytes
        (b"\xa2\x61\x62\x01\x61\x61\x02", "not_canonical"),  # keys out of order
        (b"\xd8\x1c\x01", "unsupported_type"),  # shared-reference tag
        (b"\xc2\x59\x08\x00" + b"\x01" * 2048, "unsupported_type"),  # bignum: a 2 KiB integer
        (b"\xc1\x01", "unsupported_type"),  # epoch datetime tag
        (b"\xf9\x3c\x00", "unsupported_type"),  # half float
        (b"\xf7", "unsupported_type"),  # undefined
        (b"\xa1\x01\x01", "malformed"),  # integer map key
        (b"", "empty"),
        (b"\x5a\xff\xff\xff\xff", "malformed"),  # 4 GiB byte string, 0 bytes present
    ],
)
def test_decode_refuses_non_canonical_or_foreign_cbor(data, reason):
    with pytest.raises(CodecError) as err:
        codec.decode(data)
    assert err.value.reason == reason


def test_decode_refuses_oversized_input_before_parsing():
    data = codec.encode(b"x" * 2000)
    with pytest.raises(CodecError) as err:
        codec.decode(data, max_size=1000)
    assert err.value.reason == "too_large"


def test_item_count_bounds_memory_before_anything_is_built():
    many_empty_maps = b"\x9a" + (300_000).to_bytes(4, "big") + b"\xa0" * 300_000
    with pytest.raises(CodecError) as err:
        codec.decode(many_empty_maps, max_size=1 << 20)
    assert err.value.reason == "too_many_items"
    assert codec.decode(codec.encode([{}] * 1000)) == [{}] * 1000


def test_huge_integers_are_refused_without_printing_them():
    with pytest.raises(SchemaError) as err:
        codec.as_uint(10**5000, "round")
    assert len(str(err.value)) < 100


def test_decode_refuses_deep_nesting():
    deep = b"\x81" * 40 + b"\x01"
    with pytest.raises(CodecError) as err:
        codec.decode(deep)
    assert err.value.reason == "too_deep"
    shallow = codec.encode([[[[1]]]])
    assert codec.decode(shallow, max_depth=4) == [[[[1]]]]


def test_encode_refuses_types_outside_the_data_model():
    with pytest.raises(CodecError):
        codec.encode(object())
    # cbor2 would encode a float; our decoder never accepts one back.
    with pytest.raises(CodecError):
        codec.decode(cbor2.dumps(1.5, canonical=True))


def test_schema_helpers_name_the_field():
    with pytest.raises(SchemaError, match="vote.round"):
        codec.as_uint(-1, "vote.round")
    with pytest.raises(SchemaError, match=r"missing fields \['b'\], unexpected fields \['c'\]"):
        codec.as_map({"a": 1, "c": 2}, "thing", ("a", "b"))
    with pytest.raises(SchemaError, match="expected 32 bytes"):
        codec.as_bytes(b"x", "id", size=32)
    with pytest.raises(SchemaError):
        codec.as_uint(True, "flag")
