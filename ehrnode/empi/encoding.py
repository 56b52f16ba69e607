"""Keyed encodings of demographics: what an institution publishes instead of them.

Theory of operation
-------------------
:class:`Encoder` turns :class:`~ehrnode.empi.normalize.Demographics` into
:class:`Encodings`. Every value that must compare exactly (the national id, each
blocking code, each token behind a Bloom filter) is first put through the
consortium's threshold OPRF (:mod:`ehrnode.empi.oprf`), whose key no member holds,
and then keyed under the 32-byte consortium key. So no member can test a guess of a
whole value ("is this SSN enrolled? anyone born on this day?") without asking the
others, which is counted and on the chain; and nobody outside the consortium can
test anything. A filter's tokens are few, though (bigrams, digits with their
position): a member that has had them all evaluated, as its own enrolments do,
can compute field filters offline (docs/empi.md, "The OPRF key", limits).
:meth:`Encoder.inputs` names the OPRF inputs an encoding needs; the caller has them
evaluated and hands the outputs to :meth:`Encoder.encode`:

* Per field, a **balanced Bloom filter** of the value's tokens: padded bigrams
  (Chinese names also single characters), or for dates and phone numbers each
  digit with its position. A token sets ``k`` of the ``L`` bits of the
  underlying filter, at positions read from HMAC-SHA256 of the token under a key
  derived for the field: keyed random hashing, not double hashing, whose
  positions follow an arithmetic pattern that pattern-mining attacks exploit. The
  filter is then *balanced*: concatenated with its complement and the ``2L`` bits
  permuted under another derived key, so every published filter has exactly ``L``
  bits set whatever the value's length. Given and family names share one key
  space, so a record with the two swapped can still be compared crosswise.
* The **national id pseudonym**: HMAC of the OPRF output of the scheme and normalized value.
* The **sex tag**: HMAC of the one-letter sex (compared for equality only; with two
  values, an OPRF would hide nothing).
* **Blocking keys**: HMACs of the OPRF outputs of coarse codes (a name's Soundex with the birth year,
  the postcode or the street; the birth date and sex; ...) that true matches
  almost always share; the matcher only scores records that share one (the rules
  are in ``_blocking_codes``).

The Dice coefficient of two balanced filters is ``|A & B| / L``: one minus the
share of positions where the underlying filters differ. It is computed on the
encodings alone; scoring does not need the key.

Sizes and ``k`` are per field (``FIELDS``), chosen so a value of typical length
fills about half of the underlying filter. Changing any of them, or a key
label, changes every encoding: it is a new ``WIRE_VERSION``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CryptoError, SchemaError
from . import oprf
from .normalize import Demographics, has_cjk

WIRE_VERSION = 2
KEY_BYTES = 32
#: Bytes of the national-id pseudonym, of the sex tag and of one blocking key.
NATIONAL_ID_BYTES = 16
SEX_BYTES = 8
BLOCKING_KEY_BYTES = 8
#: No record yields more blocking keys than this (see ``_blocking_codes``).
MAX_BLOCKING_KEYS = 16


@dataclass(frozen=True)
class FieldSpec:
    """One Bloom-filter field: its name (also its wire key), key space, length L and k."""

    name: str
    space: str
    bits: int
    k: int


#: The filter fields, in the order :attr:`Encodings.filters` holds them. ``bits`` is
#: the underlying length L (a power of two); the published filter has 2L bits. k is
#: about L ln 2 / (q-grams of a typical value), for a half-full underlying filter.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("given", "name", 256, 24),
    FieldSpec("family", "name", 256, 24),
    FieldSpec("birth_date", "birth_date", 128, 8),
    FieldSpec("street_number", "street_number", 64, 12),
    FieldSpec("street", "street", 512, 24),
    FieldSpec("address_extra", "address_extra", 512, 26),
    FieldSpec("locality", "locality", 256, 18),
    FieldSpec("postcode", "postcode", 64, 9),
    FieldSpec("state", "state", 64, 11),
    FieldSpec("phone", "phone", 128, 9),
)
FIELD_INDEX = {spec.name: i for i, spec in enumerate(FIELDS)}
_WIRE_KEYS = frozenset({"v", "sex", "national_id", "blocking"} | {spec.name for spec in FIELDS})


@dataclass(frozen=True)
class Encodings:
    """What one enrolment publishes about a patient; no raw value is in it.

    ``filters`` holds one balanced filter per entry of ``FIELDS`` (as an int of 2L
    bits), or None where the value is unknown. ``blocking`` is sorted and unique.
    """

    filters: tuple[int | None, ...]
    sex: bytes | None = None
    national_id: bytes | None = None
    blocking: tuple[bytes, ...] = ()

    def filter(self, name: str) -> int | None:
        return self.filters[FIELD_INDEX[name]]

    def to_wire(self) -> dict[str, Any]:
        """A CBOR-ready map of text keys to ints, byte strings and a list of byte strings."""
        out: dict[str, Any] = {"v": WIRE_VERSION, "blocking": list(self.blocking)}
        for spec, value in zip(FIELDS, self.filters, strict=True):
            if value is not None:
                out[spec.name] = value.to_bytes(spec.bits // 4, "big")
        if self.sex is not None:
            out["sex"] = self.sex
        if self.national_id is not None:
            out["national_id"] = self.national_id
        return out

    @classmethod
    def from_wire(cls, data: Any) -> Encodings:
        """Rebuild Encodings from :meth:`to_wire` output taken from untrusted input.

        Raises SchemaError naming the field for anything :meth:`to_wire` would not
        produce: unknown or missing keys, wrong types or lengths, a filter that is
        not balanced (exactly L of its 2L bits set), unsorted or repeated blocking keys.
        """
        if not isinstance(data, Mapping):
            raise SchemaError("encodings: expected a map", reason="schema")
        unknown = [k for k in data if not isinstance(k, str) or k not in _WIRE_KEYS]
        if unknown:
            raise SchemaError(f"encodings: unknown field {unknown[0]!r}")
        version = data.get("v")
        if type(version) is not int or version != WIRE_VERSION:
            raise SchemaError(f"encodings.v: expected {WIRE_VERSION}")
        filters: list[int | None] = []
        for spec in FIELDS:
            raw = data.get(spec.name)
            if raw is None and spec.name not in data:
                filters.append(None)
                continue
            if not isinstance(raw, bytes) or len(raw) != spec.bits // 4:
                raise SchemaError(f"encodings.{spec.name}: expected {spec.bits // 4} bytes")
            value = int.from_bytes(raw, "big")
            if value.bit_count() != spec.bits:
                raise SchemaError(f"encodings.{spec.name}: not a balanced filter")
            filters.append(value)
        sex = _optional_bytes(data, "sex", SEX_BYTES)
        national = _optional_bytes(data, "national_id", NATIONAL_ID_BYTES)
        blocking = data.get("blocking")
        if not isinstance(blocking, list) or len(blocking) > MAX_BLOCKING_KEYS:
            raise SchemaError(f"encodings.blocking: expected a list of at most {MAX_BLOCKING_KEYS} keys")
        for i, bkey in enumerate(blocking):
            if not isinstance(bkey, bytes) or len(bkey) != BLOCKING_KEY_BYTES:
                raise SchemaError(f"encodings.blocking[{i}]: expected {BLOCKING_KEY_BYTES} bytes")
            if i and blocking[i - 1] >= bkey:
                raise SchemaError("encodings.blocking: keys must be sorted and unique")
        return cls(tuple(filters), sex, national, tuple(blocking))


def _optional_bytes(data: Mapping[str, Any], name: str, size: int) -> bytes | None:
    if name not in data:
        return None
    value = data[name]
    if not isinstance(value, bytes) or len(value) != size:
        raise SchemaError(f"encodings.{name}: expected {size} bytes")
    return value


def qgrams(text: str) -> list[str]:
    """The q-grams of a normalized value: padded bigrams of it without spaces.

    A value with CJK characters also contributes each character alone: Chinese
    names are two or three characters, and with bigrams only one wrong character
    would leave almost nothing in common.
    """
    return sorted(_qgram_set(text))


def _qgram_set(text: str) -> set[str]:
    s = text.replace(" ", "")
    if not s:
        return set()
    padded = "\x02" + s + "\x03"
    grams = {padded[i:i + 2] for i in range(len(padded) - 1)}
    if has_cjk(s):
        grams.update(s)
    return grams


def date_tokens(date: str) -> list[str]:
    """Tokens of a YYYYMMDD date: each digit with its position, and year, month, day.

    One mistyped digit keeps 9 of 11 tokens; a different date keeps little more
    than the century.
    """
    return [f"{i}{d}" for i, d in enumerate(date)] + ["y" + date[:4], "m" + date[4:6], "d" + date[6:]]


def phone_tokens(phone: str) -> list[str]:
    """Tokens of a phone number: each digit with its position counted from the end.

    From the end, so a number written with and without its area code still lines up;
    one mistyped digit keeps all tokens but one, while two numbers that share only an
    exchange prefix (every Synthea number starts 555) keep few.
    """
    return [f"{i}{d}" for i, d in enumerate(reversed(phone))]


def soundex(name: str) -> str:
    """American Soundex of a Latin name (first letter, three digits); other scripts as is.

    Used in blocking keys only, so that a name with a typo still falls in the block
    of its correct spelling.
    """
    letters = [c for c in name if "a" <= c <= "z"]
    if not letters or len(letters) != len(name.replace(" ", "")):
        return name.replace(" ", "")
    codes = []
    previous = _SOUNDEX.get(letters[0], "")
    for c in letters[1:]:
        code = _SOUNDEX.get(c)
        if code is None:          # h, w: transparent, the previous code carries on
            continue
        if code and code != previous:
            codes.append(code)
        previous = code
    return (letters[0] + "".join(codes) + "000")[:4]


_SOUNDEX = {c: d for letters, d in (("bfpv", "1"), ("cgjkqsxz", "2"), ("dt", "3"), ("l", "4"), ("mn", "5"),
                                     ("r", "6"), ("aeiouy", "")) for c in letters}


def _blocking_codes(demo: Demographics) -> list[tuple[str, str]]:
    """(kind, code) pairs whose keyed hashes are the record's blocking keys.

    Chosen on FEBRL so that nearly every true pair shares at least one while few
    others do (docs/empi.md has the figures). Each rule leans on different fields,
    so an error in one (a typo in the family name, a wrong birth date, a new
    address) leaves others to bring the pair together. Rules over one name use the
    given and the family name alike, so a record with the two swapped still meets
    the original.
    """
    names = [soundex(n) for n in (demo.given, demo.family) if n]
    year = demo.birth_date[:4] if demo.birth_date else ""
    street = soundex(demo.street.split(" ", 1)[0]) if demo.street else ""
    locality = soundex(demo.locality) if demo.locality else ""
    codes: list[tuple[str, str]] = []
    for name in names:
        if year:
            codes.append(("name-year", name + year))
        if demo.postcode:
            codes.append(("name-postcode", name + demo.postcode))
        if locality:
            codes.append(("name-locality", name + locality))
        if street:
            codes.append(("name-street", name + street))
    if len(names) == 2:
        codes.append(("names", "\x1f".join(sorted(names))))
    if demo.birth_date:
        codes.append(("birth-date-sex", demo.birth_date + (demo.sex or "")))
    if street and locality:
        codes.append(("street-locality", street + locality))
    if demo.street_number and demo.street and demo.postcode:
        codes.append(("address", demo.street_number + demo.street[:3] + demo.postcode))
    if demo.phone:
        codes.append(("phone", demo.phone[-8:]))
    return codes


@dataclass
class _Space:
    """The hashing of one key space: its key, and per bit position the mask it toggles."""

    name: str
    key: bytes
    bits: int
    k: int
    complement: int                       # every complement position set: the empty filter
    masks: tuple[int, ...]                # position i -> its bit | its complement bit
    tokens: Callable[[str], Iterable[str]]
    grams: dict[str, int] = field(default_factory=dict)     # q-gram -> the bits it toggles
    values: dict[str, int] = field(default_factory=dict)    # value -> its filter


class MissingEvaluation(CryptoError):
    """An encoding needs OPRF outputs it was not given (``inputs``: which)."""

    def __init__(self, inputs: list[bytes]) -> None:
        super().__init__(f"{len(inputs)} OPRF evaluation(s) missing", reason="oprf_missing")
        self.inputs = inputs


class Encoder:
    """Encodes demographics under the consortium key and the OPRF; deterministic, no I/O.

    ``oprf_key`` is for tests, benchmarks and the simulator only: with it, missing OPRF outputs
    are computed here. No node holds that key; a node hands :meth:`encode` the outputs the
    consortium evaluated.
    """

    #: Entries of the per-space caches of values and of q-grams; a full cache is cleared.
    #: Hashing is most of the cost of encoding, and q-grams (a few thousand bigrams) and
    #: values (names, streets, places) recur across patients.
    VALUE_CACHE = 1 << 16
    GRAM_CACHE = 1 << 16

    def __init__(self, key: bytes, *, oprf_key: int | None = None) -> None:
        """Raises CryptoError unless ``key`` is 32 bytes."""
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise CryptoError(f"the EMPI consortium key must be {KEY_BYTES} bytes")
        self._spaces: dict[str, _Space] = {}
        for spec in FIELDS:
            if spec.space not in self._spaces:
                self._spaces[spec.space] = _make_space(key, spec)
        self._fields = tuple((spec, self._spaces[spec.space]) for spec in FIELDS)
        self._national_key = _derive(key, "national-id")
        self._sex_key = _derive(key, "sex")
        self._blocking_key = _derive(key, "blocking")
        self._oprf_key = oprf_key

    def clear_caches(self) -> None:
        """Forget cached filters and q-gram masks: they were made from another OPRF key's outputs."""
        for space in self._spaces.values():
            space.grams.clear()
            space.values.clear()

    def inputs(self, demo: Demographics) -> list[bytes]:
        """Every OPRF input :meth:`encode` may need for ``demo`` (it needs fewer when it has cached
        a value's filter); the same input recurs across patients, so callers cache outputs."""
        out: list[bytes] = []
        for spec, space in self._fields:
            value = getattr(demo, spec.name)
            if value:
                out.extend(gram_input(spec.space, g) for g in space.tokens(value))
        if demo.national_id is not None:
            out.append(national_input(*demo.national_id))
        out.extend(blocking_input(kind, code) for kind, code in _blocking_codes(demo))
        return out

    def encode(self, demo: Demographics, evaluated: Mapping[bytes, bytes] | None = None) -> Encodings:
        """The encodings of ``demo``; ``evaluated`` maps OPRF inputs (:meth:`inputs`) to their outputs.

        Raises MissingEvaluation naming any input it needs and was not given."""
        prf = _Outputs(evaluated or {}, self._oprf_key)
        filters = []
        for spec, space in self._fields:
            value = getattr(demo, spec.name)
            filters.append(self._filter(space, value, prf) if value else None)
        national = None
        if demo.national_id is not None:
            national = hmac.digest(self._national_key, prf(national_input(*demo.national_id)),
                                   "sha256")[:NATIONAL_ID_BYTES]
        sex = _mac(self._sex_key, demo.sex)[:SEX_BYTES] if demo.sex else None
        blocking = sorted({hmac.digest(self._blocking_key, prf(blocking_input(kind, code)),
                                       "sha256")[:BLOCKING_KEY_BYTES] for kind, code in _blocking_codes(demo)})
        prf.raise_missing()
        return Encodings(tuple(filters), sex, national, tuple(blocking))

    def bits_set(self, field: str, value: str, evaluated: Mapping[bytes, bytes] | None = None) -> int:
        """Bits a normalized value sets in the field's underlying L-bit filter (its fill,
        before balancing hides it). Raises KeyError for an unknown field."""
        space = self._spaces[FIELDS[FIELD_INDEX[field]].space]
        prf = _Outputs(evaluated or {}, self._oprf_key)
        filter_ = self._filter(space, value, prf)
        prf.raise_missing()
        # Each underlying bit set toggles two bits of the balanced filter (see _make_space).
        return (filter_ ^ space.complement).bit_count() // 2

    def _filter(self, space: _Space, value: str, prf: _Outputs) -> int:
        """The balanced filter of a value; values and q-grams recur, so both are cached."""
        values = space.values
        cached = values.get(value)
        if cached is not None:
            return cached
        acc = 0
        grams = space.grams
        complete = True
        for gram in space.tokens(value):
            mask = grams.get(gram)
            if mask is None:
                output = prf(gram_input(space.name, gram))
                if not output:
                    complete = False
                    continue
                if len(grams) >= self.GRAM_CACHE:
                    grams.clear()
                mask = grams[gram] = _gram_mask(space, output)
            acc |= mask
        result = space.complement ^ acc
        if complete:
            if len(values) >= self.VALUE_CACHE:
                values.clear()
            values[value] = result
        return result


def national_input(scheme: str, value: str) -> bytes:
    return f"national-id\x1f{scheme}\x1f{value}".encode()


def blocking_input(kind: str, code: str) -> bytes:
    return f"blocking\x1f{kind}\x1f{code}".encode()


def gram_input(space: str, gram: str) -> bytes:
    return f"bloom\x1f{space}\x1f{gram}".encode()


class _Outputs:
    """OPRF outputs as :meth:`Encoder.encode` reads them, noting what was missing."""

    def __init__(self, evaluated: Mapping[bytes, bytes], key: int | None) -> None:
        self._evaluated, self._key = evaluated, key
        self.missing: list[bytes] = []

    def __call__(self, value: bytes) -> bytes:
        output = self._evaluated.get(value)
        if output is None and self._key is not None:
            output = oprf.evaluate_locally(self._key, value)
        if output is None:
            self.missing.append(value)
            return b""
        return output

    def raise_missing(self) -> None:
        if self.missing:
            raise MissingEvaluation(self.missing)


#: How a field's value becomes the tokens its filter holds (q-grams unless named here).
_TOKENS: dict[str, Callable[[str], Iterable[str]]] = {"birth_date": date_tokens, "phone": phone_tokens}


def _derive(key: bytes, label: str) -> bytes:
    return hmac.digest(key, b"ehrnode/empi/v1/" + label.encode("ascii"), "sha256")


def _mac(key: bytes, text: str) -> bytes:
    return hmac.digest(key, text.encode("utf-8"), "sha256")


def _positions(key: bytes, data: bytes, bits: int, count: int) -> list[int]:
    """``count`` positions in [0, bits) from HMAC-SHA256 blocks of ``data`` (bits: a power of two).

    Positions may repeat, as in any Bloom filter; a power-of-two length keeps them unbiased.
    """
    width = 1 if bits <= 256 else 2
    out: list[int] = []
    block = 0
    while len(out) < count:
        digest = hmac.digest(key, block.to_bytes(2, "big") + data, "sha256")
        for i in range(0, len(digest), width):
            out.append(int.from_bytes(digest[i:i + width], "big") % bits)
            if len(out) == count:
                break
        block += 1
    return out


def _make_space(key: bytes, spec: FieldSpec) -> _Space:
    hash_key = _derive(key, f"bloom/{spec.space}")
    perm = _permutation(_derive(key, f"balance/{spec.space}"), 2 * spec.bits)
    # Underlying bit i lands at perm[i]; its complement bit at perm[L + i].
    complement = 0
    for i in range(spec.bits):
        complement |= 1 << perm[spec.bits + i]
    masks = tuple((1 << perm[i]) | (1 << perm[spec.bits + i]) for i in range(spec.bits))
    tokens = _TOKENS.get(spec.space, _qgram_set)
    return _Space(spec.space, hash_key, spec.bits, spec.k, complement, masks, tokens)


def _gram_mask(space: _Space, output: bytes) -> int:
    """The bits a q-gram toggles in a balanced filter (its positions and their complements), from
    the q-gram's OPRF output."""
    mask = 0
    for p in _positions(space.key, output, space.bits, space.k):
        mask |= space.masks[p]
    return mask


def _permutation(key: bytes, n: int) -> list[int]:
    """A keyed permutation of range(n): Fisher-Yates driven by HMAC-SHA256 in counter mode."""
    perm = list(range(n))
    stream = _KeyStream(key)
    for i in range(n - 1, 0, -1):
        j = stream.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class _KeyStream:
    """Unbiased integers below a bound, from HMAC-SHA256(key, counter), by rejection."""

    def __init__(self, key: bytes) -> None:
        self._key, self._counter, self._buffer = key, 0, b""

    def below(self, bound: int) -> int:
        limit = (1 << 32) - (1 << 32) % bound
        while True:
            if len(self._buffer) < 4:
                self._buffer += hmac.digest(self._key, self._counter.to_bytes(8, "big"), "sha256")
                self._counter += 1
            value, self._buffer = int.from_bytes(self._buffer[:4], "big"), self._buffer[4:]
            if value < limit:
                return value % bound
