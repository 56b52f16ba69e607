"""Matching: does an enrolment name a patient the consortium already knows?

Theory of operation
-------------------
Two :class:`~ehrnode.empi.encoding.Encodings` are compared field by field. The
Dice coefficient of a field's two filters (an integer, per mille) falls in one
of the field's *agreement levels* (``MODEL``: bands such as "identical", "one
typo apart", "different"); each level carries a Fellegi-Sunter weight,
log2(m/u) in hundredths of a bit, where m is how often true matches show that
level and u how often non-matches do. The weights were fitted once on FEBRL
and are constants here (``python benchmarks/empi_quality.py --fit`` reproduces
them). A field unknown on either side weighs nothing. Two departures from
textbook Fellegi-Sunter: names are also compared crosswise (given against
family), for records that swap them; and the area fields (locality, postcode,
state) describe one place, so their agreement counts once, not three times.

The total weight decides: at or above ``UPPER`` the enrolment links to the
candidate, at or above ``LOWER`` the pair goes to review as a potential
duplicate, below it the enrolment is a new patient. An equal national-id
pseudonym links whatever the rest says; different pseudonyms weigh against.

Every node must reach the same decision from the same committed enrolments,
so everything here is integer arithmetic on the encodings (no floats, no key,
no randomness), and whenever an order matters it is the order of ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .encoding import FIELD_INDEX, FIELDS, NATIONAL_ID_BYTES, Encodings

#: Weights are in hundredths of a bit (log2 of the likelihood ratio, times 100).
WEIGHT_SCALE = 100


@dataclass(frozen=True)
class FieldModel:
    """Agreement levels of one filter field and their weights.

    ``bands[i]`` is the lowest Dice (per mille) of level i + 1; level 0 is below
    ``bands[0]``. A band of 1000 means identical filters. ``weights[level]`` is in
    hundredths of a bit.
    """

    name: str
    bands: tuple[int, ...]
    weights: tuple[int, ...]


# Fitted on FEBRL datasets 1-3 without the national id (benchmarks/empi_quality.py
# --fit): u counted on 300,000 random pairs, m by EM over the 14,908 blocked candidate
# pairs with u fixed, weights = 100 log2(m/u) made non-decreasing in the level. Phone is
# not in FEBRL and is calibrated: only an identical number counts (partial agreement is
# common between numbers that share an exchange), capped at 8 bits because a household
# shares one, and a different number weighs little because people change numbers.
MODEL: tuple[FieldModel, ...] = (
    FieldModel("given", (700, 850, 1000), (-290, 362, 636, 711)),
    FieldModel("family", (700, 850, 1000), (-304, 541, 806, 806)),
    FieldModel("birth_date", (800, 1000), (-342, 94, 1058)),
    FieldModel("street_number", (700, 1000), (-229, -155, 579)),
    FieldModel("street", (750, 875, 1000), (-303, 28, 971, 971)),
    FieldModel("address_extra", (700, 850, 1000), (-303, 359, 915, 915)),
    FieldModel("locality", (700, 850, 1000), (-322, 460, 905, 905)),
    FieldModel("postcode", (650, 800, 1000), (-340, 82, 210, 895)),
    FieldModel("state", (1000,), (-348, 205)),
    FieldModel("phone", (1000,), (-170, 800)),
)
#: Equal sex tags, different sex tags (calibrated: m = 0.98 / 0.02, u = 0.5 / 0.5).
SEX_WEIGHTS = (97, -464)
#: Both sides carry a national-id pseudonym and they differ (calibrated, m = 0.001: an
#: id that passed its own checks rarely differs for one person).
NATIONAL_ID_DIFFERENT = -1000
#: Taken off a comparison that pairs each name with the other's other name.
SWAP_PENALTY = 100

#: A demographic blocking key shared by more enrolments than this is too common to use (the
#: ledger's registry applies the same rule); national-id keys are always used.
MAX_BLOCK = 1000
#: Demographic candidates scored for one enrolment at most (block sizes summed, smallest
#: blocks first): crafted keys that each share a big block cost every validator at most this
#: many scores. FEBRL's largest lookup takes 22.
MAX_CANDIDATES = 500

#: Decision thresholds on the total weight (hundredths of a bit), chosen on FEBRL: F1
#: peaks between 800 and 900; below 500 lie 3 of its 8,962 true candidate pairs.
UPPER = 900
LOWER = 500
#: The highest FEBRL non-match scores 1200; a link at 2000 or more is graded certain.
CERTAIN = 2000

_GIVEN, _FAMILY = FIELD_INDEX["given"], FIELD_INDEX["family"]
_OTHER_FIELDS = tuple(i for i in range(len(FIELDS)) if i not in (_GIVEN, _FAMILY))
#: Fields that describe the same area, whose agreements are not independent evidence.
_AREA = frozenset(FIELD_INDEX[name] for name in ("locality", "postcode", "state"))
_MODEL_BY_NAME = {m.name: m for m in MODEL}

Decision = Literal["link", "review", "new"]
Grade = Literal["certain", "probable", "possible"]


def _compile() -> tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]:
    """Per field: the least common-bit counts of each band, the weights, and L."""
    compiled = []
    for spec in FIELDS:
        model = _MODEL_BY_NAME[spec.name]
        if len(model.weights) != len(model.bands) + 1 or list(model.bands) != sorted(set(model.bands)):
            raise ValueError(f"MODEL entry for {spec.name} needs sorted bands and one weight per level")
        # Dice >= band/1000  <=>  common * 1000 >= band * L  <=>  common >= ceil(band * L / 1000)
        counts = tuple(-(-band * spec.bits // 1000) for band in model.bands)
        compiled.append((counts, model.weights, spec.bits))
    return tuple(compiled)


_COMPILED = _compile()


@dataclass(frozen=True)
class FieldEvidence:
    """One field's part of a score, for review.

    ``dice`` (per mille) and ``level`` are None when the field is unknown on either
    side. ``weight`` is the level's weight; ``counted`` what went into the total
    (it differs only for area fields, whose agreement counts once).
    """

    field: str
    dice: int | None
    level: int | None
    weight: int
    counted: int


@dataclass(frozen=True)
class Score:
    """The comparison of two encodings; weights in hundredths of a bit.

    ``national_id`` is "same", "different" or "absent" (not on both sides);
    ``names_swapped`` says the names agreed better crosswise (given against family).
    ``total`` is the sum of the fields' ``counted``, ``sex_weight``,
    ``national_id_weight`` and ``swap_weight``.
    """

    total: int
    national_id: str
    names_swapped: bool
    fields: tuple[FieldEvidence, ...]
    sex_weight: int = 0
    national_id_weight: int = 0
    swap_weight: int = 0


def dice(a: int, b: int, bits: int) -> int:
    """Dice coefficient of two balanced filters of 2 * ``bits`` bits, per mille (rounded down)."""
    return (a & b).bit_count() * 1000 // bits


def _compare(i: int, a: int | None, b: int | None) -> tuple[int | None, int | None, int]:
    """(dice, level, weight) of field i's filters a and b."""
    if a is None or b is None:
        return None, None, 0
    counts, weights, bits = _COMPILED[i]
    common = (a & b).bit_count()
    level = 0
    for least in counts:
        if common < least:
            break
        level += 1
    return common * 1000 // bits, level, weights[level]


def score(a: Encodings, b: Encodings) -> Score:
    """Compare two encodings: symmetric (the same total from either side), deterministic,
    integer arithmetic only."""
    fa, fb = a.filters, b.filters
    if a.national_id is None or b.national_id is None:
        national, national_w = "absent", 0
    elif a.national_id == b.national_id:
        national, national_w = "same", 0
    else:
        national, national_w = "different", NATIONAL_ID_DIFFERENT
    sex_w = 0
    if a.sex is not None and b.sex is not None:
        sex_w = SEX_WEIGHTS[0] if a.sex == b.sex else SEX_WEIGHTS[1]

    # Names, straight or crosswise. Crosswise, p compares a's given name with b's family
    # name and q a's family name with b's given name; which of the two is weighed as the
    # given name is settled the less favourable way, so the total is the same from either
    # side. Crosswise must beat straight by more than SWAP_PENALTY to be taken.
    g, f = _compare(_GIVEN, fa[_GIVEN], fb[_GIVEN]), _compare(_FAMILY, fa[_FAMILY], fb[_FAMILY])
    p_given, q_family = _compare(_GIVEN, fa[_GIVEN], fb[_FAMILY]), _compare(_FAMILY, fa[_FAMILY], fb[_GIVEN])
    q_given, p_family = _compare(_GIVEN, fa[_FAMILY], fb[_GIVEN]), _compare(_FAMILY, fa[_GIVEN], fb[_FAMILY])
    crossed = min((p_given[2] + q_family[2], 0, p_given, q_family), (q_given[2] + p_family[2], 1, q_given, p_family))
    swapped = crossed[0] - SWAP_PENALTY > g[2] + f[2]
    if swapped:
        g, f = crossed[2], crossed[3]
    evidence: list[FieldEvidence | None] = [None] * len(FIELDS)
    evidence[_GIVEN] = FieldEvidence("given", g[0], g[1], g[2], g[2])
    evidence[_FAMILY] = FieldEvidence("family", f[0], f[1], f[2], f[2])

    # Area fields describe one place (a postcode implies its locality and state): their
    # agreement is counted once, the strongest; every disagreement still counts.
    area_best = None
    for i in _OTHER_FIELDS:
        d, level, weight = _compare(i, fa[i], fb[i])
        evidence[i] = FieldEvidence(FIELDS[i].name, d, level, weight, weight)
        if i in _AREA and weight > 0:
            best = evidence[area_best] if area_best is not None else None
            if best is None or weight > best.weight:
                area_best = i
    for i in _AREA:
        e = evidence[i]
        assert e is not None  # every field was compared above
        if e.weight > 0 and i != area_best:
            evidence[i] = FieldEvidence(e.field, e.dice, e.level, e.weight, 0)
    fields = tuple(e for e in evidence if e is not None)
    swap_w = -SWAP_PENALTY if swapped else 0
    total = sum(e.counted for e in fields) + sex_w + national_w + swap_w
    return Score(total, national, swapped, fields, sex_w, national_w, swap_w)


def classify(s: Score) -> Decision:
    """"link" (same patient), "review" (potential duplicate) or "new" (another patient)."""
    if s.national_id == "same" or s.total >= UPPER:
        return "link"
    return "review" if s.total >= LOWER else "new"


def match_grade(s: Score) -> Grade | None:
    """FHIR match grade: certain (equal national id, or total >= CERTAIN), probable (a link
    on demographics), possible (review), or None for a different patient."""
    if s.national_id == "same" or s.total >= CERTAIN:
        return "certain"
    if s.total >= UPPER:
        return "probable"
    return "possible" if s.total >= LOWER else None


def blocking_keys(enc: Encodings) -> list[bytes]:
    """The keys under which an enrolment is indexed and looks for candidates, sorted.

    The demographic keys (8 bytes) and, when there is one, the national-id pseudonym
    (16 bytes, so it never collides with them). A persistent index stores one row
    per (key, enrolment) and must give :meth:`Index.candidates` the same answer.
    """
    keys = list(enc.blocking)
    if enc.national_id is not None:
        keys.append(enc.national_id)
    return sorted(keys)


def usable_blocks(sizes: Mapping[bytes, int]) -> list[bytes]:
    """Which blocking keys give candidates, from each key's block size (enrolments under it).

    National-id keys always. Demographic keys smallest block first (ties by key), each only if
    its block holds at most ``MAX_BLOCK`` enrolments and the blocks taken so far, with it, hold
    at most ``MAX_CANDIDATES``. Depends on nothing but ``sizes``, so every node chooses alike.
    """
    chosen = [key for key in sizes if len(key) == NATIONAL_ID_BYTES]
    taken = 0
    for key in sorted((k for k in sizes if len(k) != NATIONAL_ID_BYTES), key=lambda k: (sizes[k], k)):
        size = sizes[key]
        if size > MAX_BLOCK or taken + size > MAX_CANDIDATES:
            break  # the rest are as big or bigger
        chosen.append(key)
        taken += size
    return sorted(chosen)


class Index:
    """In-memory blocking index of enrolments: candidates for a new one, best first.

    Its answers depend only on which enrolments it holds, never on the order they
    were added: candidates are sorted by id, rankings by weight then id. A
    demographic block holding more than ``MAX_BLOCK`` enrolments is too common to
    discriminate (a placeholder birth date, a big city's main street) and is
    skipped, and at most ``MAX_CANDIDATES`` are taken from demographic blocks;
    national-id blocks are always used (:func:`usable_blocks`, the ledger's rule too).
    """

    def __init__(self) -> None:
        self._blocks: dict[bytes, list[str]] = {}
        self._entries: dict[str, Encodings] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, enrolment_id: object) -> bool:
        return enrolment_id in self._entries

    def get(self, enrolment_id: str) -> Encodings:
        """The encodings of an enrolment (KeyError if it is not indexed)."""
        return self._entries[enrolment_id]

    def add(self, enrolment_id: str, enc: Encodings) -> None:
        """Index an enrolment; raises ValueError if the id is already indexed."""
        if enrolment_id in self._entries:
            raise ValueError(f"enrolment {enrolment_id!r} is already indexed")
        self._entries[enrolment_id] = enc
        for key in blocking_keys(enc):
            self._blocks.setdefault(key, []).append(enrolment_id)

    def candidates(self, enc: Encodings) -> list[str]:
        """Ids of indexed enrolments sharing a usable blocking key with ``enc`` (see
        :func:`usable_blocks`), sorted."""
        sizes = {key: len(self._blocks[key]) for key in blocking_keys(enc) if key in self._blocks}
        found: set[str] = set()
        for key in usable_blocks(sizes):
            found.update(self._blocks[key])
        return sorted(found)

    def ranked(self, enc: Encodings) -> list[tuple[str, Score]]:
        """Every candidate with its score, best first: an equal national id, then by total, ties by id."""
        scored = [(cid, score(enc, self._entries[cid])) for cid in self.candidates(enc)]
        scored.sort(key=lambda item: (item[1].national_id != "same", -item[1].total, item[0]))
        return scored
