"""Canonical CBOR: the only byte form of anything ehrnode hashes, signs or sends.

Theory of operation
-------------------
Ids and signatures are computed over the exact bytes of :func:`encode`, so there
must be one encoding per value. We use cbor2's canonical mode (RFC 7049
canonical: shortest integers, definite lengths, map keys sorted length-first)
and restrict values to a small data model: unsigned and negative integers,
byte strings, text strings, arrays, maps with text keys, booleans and null. No floats, no tags.

Bytes from outside go through :func:`decode`, which is strict: a size cap before
anything is parsed (cbor2 can use ~70x the input size in memory), no indefinite
lengths, no duplicate keys, a depth cap, no trailing bytes, only the data model
above, and finally the bytes must be exactly the canonical encoding of what they
decoded to. Anything else is a :class:`~ehrnode.errors.CodecError`.

The ``as_*`` helpers then check a decoded value's shape field by field and raise
:class:`~ehrnode.errors.SchemaError` naming the field, so typed message classes
can be built from untrusted input in a few lines each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cbor2

from .errors import CodecError, SchemaError

#: Default cap on one encoded message; callers with bigger legitimate payloads
#: (block sync responses) pass their own.
MAX_MESSAGE_BYTES = 1 << 20
#: Nesting deeper than this is never produced by ehrnode itself.
MAX_DEPTH = 16
#: Largest unsigned integer we accept in any field (fits SQLite's INTEGER).
MAX_UINT = (1 << 63) - 1
#: Data items one message may hold. Decoded Python objects cost up to ~150x the bytes
#: of their encoding (an array of empty maps), so items, not bytes, bound the memory.
MAX_ITEMS = 200_000

def encode(value: Any) -> bytes:
    """The canonical CBOR bytes of ``value`` (raises CodecError for unsupported types)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode value: {exc}") from exc


def decode(
    data: bytes, *, max_size: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
) -> Any:
    """Decode untrusted ``data`` strictly; see the module docstring for the rules.

    One pass over the item headers (:func:`_scan`) checks every rule but UTF-8 before anything
    is built, canonical form included; cbor2 then builds the value, refusing text that is not
    UTF-8. Nothing is encoded again to compare: the scan's rules are exactly what makes the bytes
    the canonical encoding of what they decode to (tested against that comparison).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}", reason="not_bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise CodecError(f"message of {len(data)} bytes exceeds the limit of {max_size}", reason="too_large")
    if not data:
        raise CodecError("empty message", reason="empty")
    _scan(data, max_depth, max_items)
    try:
        return cbor2.loads(data)
    except RecursionError as exc:
        raise CodecError("nesting too deep", reason="too_deep") from exc
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise CodecError(f"malformed CBOR: {exc}", reason="malformed") from exc


#: Header sizes past the initial byte, with the smallest argument each may carry: anything
#: smaller has a shorter encoding.
_HEADS = {24: (1, 24), 25: (2, 1 << 8), 26: (4, 1 << 16), 27: (8, 1 << 32)}
_SIMPLE_OK = {20, 21, 22}  # false, true, null


def _scan(data: bytes, max_depth: int, max_items: int) -> None:
    """Walk the item headers without building anything and refuse what is not canonical CBOR
    of the data model: bound the items (counted as containers declare them) and the depth,
    refuse indefinite lengths, tags, floats and simple values outside false/true/null,
    arguments not in their shortest form, map keys that are not text or not in canonical order
    (length first, then bytewise; a repeated key is out of order), and make sure the message
    ends exactly where its last item does."""
    pos, end, items = 0, len(data), 1
    # Per open level, and for the innermost in ``remaining`` and ``previous``: the items still
    # expected, and for a map the previous key's bytes (b"" before the first; None for an array).
    pending: list[int] = [1]
    keys: list[bytes | None] = [None]
    remaining, previous = 1, None
    while True:
        if remaining == 0:
            pending.pop()
            keys.pop()
            if not pending:
                break
            remaining, previous = pending[-1], keys[-1]
            continue
        if pos >= end:
            raise CodecError("message ends inside an item", reason="malformed")
        start = pos
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            arg = info
        else:
            head = _HEADS.get(info)
            if head is None:
                if info == 31:
                    raise CodecError("indefinite-length item", reason="malformed")
                raise CodecError(f"reserved additional information {info}", reason="malformed")
            size, least = head
            if pos + size > end:
                raise CodecError("message ends inside an item header", reason="malformed")
            arg = int.from_bytes(data[pos:pos + size], "big")
            pos += size
            if arg < least and major != 7:
                raise CodecError("an argument not in its shortest form", reason="not_canonical")
        is_key = previous is not None and not remaining & 1  # a map's items alternate key, value
        remaining -= 1
        if major == 2 or major == 3:
            if arg > end - pos:
                raise CodecError("string longer than the message", reason="malformed")
            pos += arg
            if is_key:
                if major != 3:
                    raise CodecError("a map key that is not text", reason="malformed")
                key = data[start:pos]
                if previous and (len(key) < len(previous) or (len(key) == len(previous) and key <= previous)):
                    reason = "malformed" if key == previous else "not_canonical"
                    raise CodecError("map keys repeated or not in canonical order", reason=reason)
                previous = key
            continue
        if is_key:
            raise CodecError("a map key that is not text", reason="malformed")
        if major < 2:
            continue
        if major == 4 or major == 5:
            count = arg << 1 if major == 5 else arg
            items += count
            if items > max_items:
                raise CodecError(f"more than {max_items} data items", reason="too_many_items")
            if len(pending) > max_depth:
                raise CodecError(f"nesting deeper than {max_depth}", reason="too_deep")
            pending[-1], keys[-1] = remaining, previous
            remaining, previous = count, (b"" if major == 5 else None)
            pending.append(remaining)
            keys.append(previous)
        elif major == 6:
            raise CodecError(f"tag {arg}: tags are not used", reason="unsupported_type")
        elif info >= 24 or arg not in _SIMPLE_OK:
            raise CodecError("floats and simple values other than false/true/null are not used",
                             reason="unsupported_type")
    if pos != end:
        raise CodecError(f"{end - pos} trailing bytes after the message", reason="trailing_bytes")


# --- tagged messages ------------------------------------------------------------


def encode_tagged(name: str, body: Any) -> bytes:
    """``{"type": name, "body": body}``: the envelope of every message on a wire."""
    return encode({"type": name, "body": body})


def decode_tagged(
    data: bytes, what: str, parsers: Mapping[str, Callable[[Any], Any]], *, max_size: int = MAX_MESSAGE_BYTES,
) -> Any:
    """Strictly decode an envelope and parse its body with the parser its type names."""
    envelope = as_map(decode(data, max_size=max_size), what, ("type", "body"))
    name = as_str(envelope["type"], f"{what}.type", max_len=32)
    parse = parsers.get(name)
    if parse is None:
        raise SchemaError(f"{what}.type: unknown {what} type {name!r}")
    return parse(envelope["body"])


# --- schema helpers -------------------------------------------------------------


def as_map(value: Any, what: str, keys: Iterable[str], optional: Iterable[str] = ()) -> Mapping[str, Any]:
    """``value`` as a map with exactly ``keys`` and any of ``optional`` (nothing missing, nothing else)."""
    if not isinstance(value, dict):
        raise SchemaError(f"{what}: expected a map, got {type(value).__name__}")
    expected = set(keys)
    present = set(value) - (set(optional) & set(value))
    if present != expected:
        missing = sorted(map(str, expected - present))
        extra = sorted(map(str, present - expected))
        raise SchemaError(f"{what}: missing fields {missing}, unexpected fields {extra}")
    return value


def as_uint(value: Any, what: str, *, maximum: int = MAX_UINT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"{what}: expected an unsigned integer, got {type(value).__name__}")
    if value < 0 or value > maximum:
        raise SchemaError(f"{what}: value outside 0..{maximum}")
    return value


def as_bytes(value: Any, what: str, *, size: int | None = None, max_len: int = MAX_MESSAGE_BYTES) -> bytes:
    if not isinstance(value, bytes):
        raise SchemaError(f"{what}: expected bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise SchemaError(f"{what}: expected {size} bytes, got {len(value)}")
    if len(value) > max_len:
        raise SchemaError(f"{what}: {len(value)} bytes exceeds {max_len}")
    return value


def as_str(value: Any, what: str, *, max_len: int = 256) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{what}: expected text, got {type(value).__name__}")
    if len(value) > max_len:
        raise SchemaError(f"{what}: text longer than {max_len}")
    return value


def as_list(value: Any, what: str, *, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise SchemaError(f"{what}: expected an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise SchemaError(f"{what}: {len(value)} items exceeds {max_len}")
    return value


def as_optional(value: Any, what: str, parse: Any) -> Any:
    """``None`` stays ``None``; anything else goes through ``parse(value, what)``."""
    return None if value is None else parse(value, what)
