"""Keyed encodings and their wire form (ehrnode/empi/encoding.py)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys

import pytest

from ehrnode import codec
from ehrnode.empi import oprf
from ehrnode.empi.encoding import (
    BLOCKING_KEY_BYTES,
    FIELDS,
    MAX_BLOCKING_KEYS,
    Encoder,
    Encodings,
    MissingEvaluation,
    date_tokens,
    national_input,
    qgrams,
    soundex,
)
from ehrnode.empi.matching import dice
from ehrnode.empi.normalize import Demographics
from ehrnode.errors import CryptoError, SchemaError

from ..datasets import FEBRL

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
OPRF_KEY = 0x5EED

DEMO = Demographics(
    given="sumiko", family="medhurst", birth_date="19270521", sex="f", street_number="633",
    street="abernathy landing", address_extra="unit 4", locality="emporia", postcode="66801", state="ks",
    phone="5558107203", national_id=("us-ssn", "999945397"),
)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(KEY, oprf_key=OPRF_KEY)


def test_key_must_be_32_bytes():
    with pytest.raises(CryptoError):
        Encoder(bytes(16))


def test_qgrams_are_padded_bigrams_and_chinese_adds_characters():
    assert qgrams("ann") == sorted(["\x02a", "an", "nn", "n\x03"])
    assert qgrams("mc carthy") == qgrams("mccarthy")
    assert set(qgrams("王伟")) == {"\x02王", "王伟", "伟\x03", "王", "伟"}
    assert qgrams("") == []


def test_date_tokens_keep_most_of_a_date_with_one_typo():
    a, b = set(date_tokens("19270521")), set(date_tokens("19270531"))
    assert len(a) == 11 and len(a & b) == 9


@pytest.mark.parametrize("name, code", [
    ("robert", "R163"), ("rupert", "R163"), ("ashcraft", "A261"), ("tymczak", "T522"),
    ("pfister", "P236"), ("honeyman", "H555"), ("lee", "L000"), ("王", "王"),
])
def test_soundex(name, code):
    assert soundex(name).upper() == code


def test_encoding_is_deterministic_under_a_key(encoder):
    assert encoder.encode(DEMO) == Encoder(KEY, oprf_key=OPRF_KEY).encode(DEMO)


def test_encodings_under_another_key_are_unrelated(encoder):
    a, b = encoder.encode(DEMO), Encoder(OTHER_KEY, oprf_key=OPRF_KEY).encode(DEMO)
    assert a.national_id != b.national_id and a.sex != b.sex
    assert not set(a.blocking) & set(b.blocking)
    for spec, x, y in zip(FIELDS, a.filters, b.filters, strict=False):
        # Two unrelated balanced filters agree on about half their bits; the same value
        # under one key on all of them.
        assert dice(x, y, spec.bits) < 750, spec.name
        assert dice(x, x, spec.bits) == 1000


def test_no_raw_value_appears_in_the_encodings(encoder):
    wire = encoder.encode(DEMO).to_wire()
    data = codec.encode(wire)
    raw = [DEMO.given, DEMO.family, DEMO.birth_date, DEMO.street, DEMO.locality, DEMO.postcode, DEMO.phone,
           DEMO.national_id[1], "1927", "0521", "medh", "5558"]
    for value in raw:
        assert value.encode() not in data, value
    assert all(isinstance(v, (bytes, int)) or (isinstance(v, list) and all(isinstance(x, bytes) for x in v))
               for v in wire.values())


def test_every_filter_is_balanced(encoder):
    enc = encoder.encode(DEMO)
    for spec, value in zip(FIELDS, enc.filters, strict=False):
        assert value is not None and value.bit_count() == spec.bits      # exactly half of 2L
        assert value.bit_length() <= 2 * spec.bits


def test_underlying_fill_is_near_half_on_febrl(encoder):
    with open(FEBRL / "dataset1.csv", newline="") as fh:
        demos = [Demographics.from_febrl(row) for row in csv.DictReader(fh, skipinitialspace=True)]
    for spec in FIELDS:
        values = [getattr(d, spec.name) for d in demos if getattr(d, spec.name)]
        if not values:
            continue            # phone: not in FEBRL
        fill = statistics.mean(encoder.bits_set(spec.name, v) / spec.bits for v in values)
        assert 0.35 <= fill <= 0.65, (spec.name, fill)


def test_given_and_family_names_share_a_key_space_other_fields_do_not(encoder):
    a = encoder.encode(Demographics(given="karlsen", family="spyke", locality="karlsen"))
    b = encoder.encode(Demographics(given="spyke", family="karlsen"))
    assert a.filter("given") == b.filter("family")
    assert a.filter("locality") != a.filter("given")


def test_missing_values_are_absent(encoder):
    enc = encoder.encode(Demographics(family="smith"))
    assert enc.filter("given") is None and enc.sex is None and enc.national_id is None
    assert set(enc.to_wire()) == {"v", "family", "blocking"}


def test_wire_round_trip(encoder):
    for demo in (DEMO, Demographics(family="smith"), Demographics()):
        enc = encoder.encode(demo)
        assert Encodings.from_wire(enc.to_wire()) == enc
        assert Encodings.from_wire(codec.decode(codec.encode(enc.to_wire()))) == enc


def test_wire_form_is_stable(encoder):
    # Any change to FIELDS, k, key labels or q-grams changes every enrolment on chain:
    # it needs a new WIRE_VERSION, and this digest updated with it.
    digest = hashlib.sha256(codec.encode(encoder.encode(DEMO).to_wire())).hexdigest()
    assert digest == EXPECTED_DIGEST


EXPECTED_DIGEST = "b19d673397fb4e8d8393a7e97f1f1e3a137b8eeaefd17b8a74655c32d6173ee8"


_IN_A_SUBPROCESS = """
import dataclasses, hashlib, json, sys
from ehrnode import codec
from ehrnode.empi.encoding import Encoder
from ehrnode.empi.normalize import Demographics
fields = json.loads(sys.argv[1])
fields["national_id"] = tuple(fields["national_id"])
enc = Encoder(bytes(range(32)), oprf_key=0x5EED).encode(Demographics(**fields))
print(hashlib.sha256(codec.encode(enc.to_wire())).hexdigest())
"""


def test_encoding_does_not_depend_on_the_hash_seed():
    # Set and dict order vary with PYTHONHASHSEED between processes; encodings must not.
    fields = json.dumps(dataclasses.asdict(DEMO))
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _IN_A_SUBPROCESS, fields], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.stdout.strip() == EXPECTED_DIGEST


def _wire(encoder: Encoder) -> dict:
    return encoder.encode(DEMO).to_wire()


@pytest.mark.parametrize("change, field", [
    (lambda w: w.update(extra=b"x"), "extra"),
    (lambda w: w.pop("v"), "encodings.v"),
    (lambda w: w.update(v=1), "encodings.v"),
    (lambda w: w.update(v=True), "encodings.v"),
    (lambda w: w.update(given=w["given"][:-1]), "encodings.given"),
    (lambda w: w.update(given="text"), "encodings.given"),
    (lambda w: w.update(family=bytes(len(w["family"]))), "encodings.family"),          # not balanced
    (lambda w: w.update(state=b"\xff" * len(w["state"])), "encodings.state"),
    (lambda w: w.update(national_id=b"short"), "encodings.national_id"),
    (lambda w: w.update(sex=None), "encodings.sex"),
    (lambda w: w.update(blocking="keys"), "encodings.blocking"),
    (lambda w: w.update(blocking=[b"x" * BLOCKING_KEY_BYTES] * 2), "encodings.blocking"),        # repeated
    (lambda w: w.update(blocking=sorted(w["blocking"], reverse=True)), "encodings.blocking"),   # unsorted
    (lambda w: w.update(blocking=[b"short"]), "encodings.blocking[0]"),
    (lambda w: w.update(blocking=[i.to_bytes(8, "big") for i in range(MAX_BLOCKING_KEYS + 1)]), "encodings.blocking"),
])
def test_strict_decoding_names_the_bad_field(encoder, change, field):
    wire = _wire(encoder)
    change(wire)
    with pytest.raises(SchemaError) as info:
        Encodings.from_wire(wire)
    assert field in str(info.value)


def test_decoding_refuses_what_is_not_a_map():
    with pytest.raises(SchemaError):
        Encodings.from_wire([1, 2])
    with pytest.raises(SchemaError):
        Encodings.from_wire({1: b""})


def test_exact_values_go_through_the_oprf_and_nothing_encodes_without_its_outputs():
    # The consortium key alone encodes nothing: every exact value needs the OPRF's output.
    bare = Encoder(KEY)
    with pytest.raises(MissingEvaluation) as caught:
        bare.encode(DEMO)
    inputs = bare.inputs(DEMO)
    assert set(caught.value.inputs) <= set(inputs)
    assert national_input(*DEMO.national_id) in inputs
    # Given the outputs (as the consortium evaluates them), it is the same encoding.
    evaluated = {value: oprf.evaluate_locally(OPRF_KEY, value) for value in inputs}
    assert bare.encode(DEMO, evaluated) == Encoder(KEY, oprf_key=OPRF_KEY).encode(DEMO)
    # Under another OPRF key (another consortium), nothing exact is shared, even with the same key.
    other = Encoder(KEY, oprf_key=OPRF_KEY + 1).encode(DEMO)
    mine = Encoder(KEY, oprf_key=OPRF_KEY).encode(DEMO)
    assert other.national_id != mine.national_id and not set(other.blocking) & set(mine.blocking)
    assert other.sex == mine.sex          # two values: not worth an evaluation
