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
them). A field unknown on either side weighs nothing. Three departures from
textbook Fellegi-Sunter, all where its independence assumption fails: names are
also compared crosswise (given against family), for records that swap them; the
fields of one dwelling (number, street, extra line, phone), and those of one area
(locality, postcode, state), agree together, so each group's agreement counts
once; and a move changes every place field at once, so when the person fields
(names, birth date, sex) all agree the place fields may be read as one event,
"moved", instead of six or seven disagreements.

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
from typing import Literal, TypeVar

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
#: A patient who moved between two registrations has every place field (street, number,
#: area, phone) different at once, and the place fields' weights, fitted as if independent,
#: count that one event six or seven times (-17 to -20 bits). When the person fields all agree
#: (both names at least ``NAME_FUZZY``, the birth date identical, the sex known and equal),
#: the place fields are also read as one event, "moved", which weighs ``MOVED`` (calibrated,
#: not in FEBRL: m = 0.1, one patient in ten registered at two institutions moved between;
#: u = 1, different people live apart). The total is the better of the two readings.
MOVED = -332
#: Dice (per mille) each name needs for the "moved" reading: one typo in a short name keeps
#: 620-700, two unrelated names fall below 650 in 98% of pairs.
NAME_FUZZY = 650

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
#: Fields about where the patient lives, which a move changes together.
_PLACE = frozenset(FIELD_INDEX[name] for name in
                   ("street_number", "street", "address_extra", "locality", "postcode", "state", "phone"))
#: Fields that describe one dwelling: everyone living there shares them (the phone too, when
#: it is the home's).
_DWELLING = frozenset(FIELD_INDEX[name] for name in ("street_number", "street", "address_extra", "phone"))
#: Groups whose agreements count once, the strongest (``score``).
_GROUPS = (tuple(sorted(_DWELLING)), tuple(sorted(_AREA)))
_BIRTH_DATE = FIELD_INDEX["birth_date"]
_MODEL_BY_NAME = {m.name: m for m in MODEL}

Decision = Literal["link", "review", "new"]
_Id = TypeVar("_Id", str, bytes)
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
#: The birth date's level for identical filters.
_TOP_BIRTH_DATE_LEVEL = len(_COMPILED[_BIRTH_DATE][0])


@dataclass(frozen=True)
class FieldEvidence:
    """One field's part of a score, for review.

    ``dice`` (per mille) and ``level`` are None when the field is unknown on either
    side. ``weight`` is the level's weight; ``counted`` what went into the total
    (0 for a dwelling or area field whose group's agreement was counted on another
    field, and for every place field when the pair was read as "moved").
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
    ``names_swapped`` says the names agreed better crosswise (given against family);
    ``moved`` that the place fields were read as one move (``MOVED``), their ``counted`` 0;
    ``household`` that the given name and the birth date both disagree where the dwelling
    agrees: maybe someone else living there, so never linked on demographics (``classify``).
    ``total`` is the sum of the fields' ``counted``, ``sex_weight``,
    ``national_id_weight``, ``swap_weight`` and ``moved_weight``.
    """

    total: int
    national_id: str
    names_swapped: bool
    fields: tuple[FieldEvidence, ...]
    sex_weight: int = 0
    national_id_weight: int = 0
    swap_weight: int = 0
    moved: bool = False
    moved_weight: int = 0
    household: bool = False


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
    # On a tie the option is chosen by what it holds, not by which side listed it first (the
    # other side lists the same two in the other order), so every flag below stays symmetric.
    crossed_total, _, crossed_given, crossed_family = min(
        (p_given[2] + q_family[2], (p_given[2], _dice(p_given), _dice(q_family)), p_given, q_family),
        (q_given[2] + p_family[2], (q_given[2], _dice(q_given), _dice(p_family)), q_given, p_family))
    swapped = crossed_total - SWAP_PENALTY > g[2] + f[2]
    if swapped:
        g, f = crossed_given, crossed_family
    evidence: list[FieldEvidence | None] = [None] * len(FIELDS)
    evidence[_GIVEN] = FieldEvidence("given", g[0], g[1], g[2], g[2])
    evidence[_FAMILY] = FieldEvidence("family", f[0], f[1], f[2], f[2])

    for i in _OTHER_FIELDS:
        d, level, weight = _compare(i, fa[i], fb[i])
        evidence[i] = FieldEvidence(FIELDS[i].name, d, level, weight, weight)
    compared = [e for e in evidence if e is not None]
    assert len(compared) == len(FIELDS)  # every field was compared above
    # The fields of one dwelling (number, street, extra line, a home phone) are shared by
    # everyone living there, and those of one area (locality, postcode, state) imply each
    # other: within each group the agreement counts once, the strongest; every disagreement
    # still counts.
    for group in _GROUPS:
        agreeing = [i for i in group if compared[i].weight > 0]
        best = max(agreeing, key=lambda i: (compared[i].weight, -i), default=None)
        for i in agreeing:
            if i != best:
                compared[i] = _uncounted(compared[i])
    swap_w = -SWAP_PENALTY if swapped else 0
    total = sum(e.counted for e in compared) + sex_w + national_w + swap_w
    birth = compared[_BIRTH_DATE]
    if compared[_GIVEN].level == 0 and birth.level == 0 and any(compared[i].weight > 0 for i in _DWELLING):
        return Score(total, national, swapped, tuple(compared), sex_w, national_w, swap_w, household=True)
    # A move changes every place field at once; read so, it is one event (see MOVED).
    if (sex_w > 0 and birth.level == _TOP_BIRTH_DATE_LEVEL and g[0] is not None and f[0] is not None
            and min(g[0], f[0]) >= NAME_FUZZY):
        place = sum(compared[i].counted for i in _PLACE)
        if MOVED > place:
            moved = tuple(_uncounted(e) if i in _PLACE else e for i, e in enumerate(compared))
            return Score(total - place + MOVED, national, swapped, moved, sex_w, national_w, swap_w, True, MOVED)
    return Score(total, national, swapped, tuple(compared), sex_w, national_w, swap_w)


def _person_agrees(s: Score) -> bool:
    """The given name and the birth date are known on both sides and above their lowest level."""
    levels = {e.field: e.level for e in s.fields}
    return all((levels[name] or 0) > 0 for name in ("given", "birth_date"))


def _dice(compared: tuple[int | None, int | None, int]) -> int:
    return -1 if compared[0] is None else compared[0]


def _uncounted(e: FieldEvidence) -> FieldEvidence:
    return FieldEvidence(e.field, e.dice, e.level, e.weight, 0)


def classify(s: Score) -> Decision:
    """"link" (same patient), "review" (potential duplicate) or "new" (another patient).

    A ``household`` pair (another given name and birth date at the same dwelling) is at most
    reviewed: a mother and her daughter share a family name, an address and a phone, which
    outweigh two disagreements, and linking them would give each the other's records."""
    if s.national_id == "same" or (s.total >= UPPER and not s.household):
        return "link"
    return "review" if s.total >= LOWER else "new"


def match_grade(s: Score) -> Grade | None:
    """FHIR match grade: certain (equal national id, or total >= CERTAIN), probable (a link
    on demographics), possible (review), or None for a different patient.

    "Certain" on demographics is what lets a link join another institution's EMPI without its
    agreement, so it also needs the given name and the birth date known and agreeing (a record
    without them, at a relative's address, can score high on the family name and the place)
    and the pair not read as ``moved`` (which rests on the names, birth date and sex alone,
    which twins with similar names, or namesakes born the same day, can share). A
    ``household`` pair is possible at most (``classify``)."""
    if s.national_id == "same":
        return "certain"
    if s.total >= CERTAIN and not s.household and not s.moved and _person_agrees(s):
        return "certain"
    if s.total >= UPPER and not s.household:
        return "probable"
    return "possible" if s.total >= LOWER else None


def best_first(s: Score, candidate: _Id) -> tuple[bool, int, _Id]:
    """Sort key of scored candidates, best first: those that link (a household pair may score
    higher and not link), then by total, ties by id. The ledger's registry ranks by it too."""
    return classify(s) != "link", -s.total, candidate


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
    were added: candidates are sorted by id, rankings (:meth:`ranked`) by national id, then
    those that link, then weight, then id. A
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
        """Every candidate with its score, best first: an equal national id, then those that link
        (a household pair may score higher and not link), then by total, ties by id."""
        scored = [(cid, score(enc, self._entries[cid])) for cid in self.candidates(enc)]
        scored.sort(key=lambda item: (item[1].national_id != "same", *best_first(item[1], item[0])))
        return scored
