"""De-identification: the form in which a patient's FHIR record may leave the institution.

Theory of operation
-------------------
A *profile* (TOML; ``profiles/default.toml`` unless the node names another) gives each
element of a resource one of eight methods: ``redact`` (remove it), ``keep``,
``generalize`` (a date to its year, an Address to state and country, an Age of 90 or
more to "90 or more"), ``date-shift`` (move it by the patient's offset in days),
``pseudonym`` (a keyed hash in place of an id, reference or identifier), ``scrub``
(free text with the patient's identifiers, dates, ages over 89, identifying patterns and
other people's names replaced by typed markers, :mod:`.notes`), ``coded-text`` (a
CodeableConcept's text, kept only where it repeats one of its codings' displays) and
``coded`` (a Coding, Quantity or URI by the allow-list of terminologies).

The engine walks the resource's JSON with the R4B model classes as its schema, so the
FHIR type of every element is known wherever it sits. A rule names an element by path
from the resource (``address.line``), by data type anywhere (``<HumanName>``), or by a
data type and a path below it (``<Attachment>.data``). A resource type's section is laid
over the ``"*"`` section, then the most specific rule wins: a path, then a data type with
the longest path below it, then a bare data type (a specialization such as Age also
matches its base, Quantity). ``keep`` on a complex element, like no rule at all, keeps
it and applies the rules to what is inside it; so no rule ever releases something a
more specific rule removes. The default profile redacts ``<string>`` and ``<markdown>``
(free text) and keeps only the strings it names (code displays, units, ...), so an
element nobody thought of is dropped, not released. An element the schema does not
know, or a modifier extension that would be dropped, makes the resource unreleasable.

Extensions are released by allow-list only (``[extensions]``): a listed URL releases the
extension with its value walked by the element rules, only the sub-extensions and codes
its entry names; any other extension is dropped, and one left with no value too.

One 32-byte institution key drives everything keyed. HMAC-SHA256 under it, with a label
per use, gives pseudonyms shaped like random UUIDs (the same input always gives the
same pseudonym, so ``Encounter/x`` and the Encounter whose id is x still match; a
reference to a provider or place is kept, as is its resource's id) and each patient's
date offset, a nonzero number of days in the profile's range, the same for every
resource of that patient so intervals survive.

A Patient's quasi-identifiers (birth date, gender, address) are written by
:mod:`.kanon` at the k-anonymity level chosen for the patient; level 0 is the profile's
Safe Harbor form. Whatever a removal leaves invalid is repaired the FHIR way: a
required element that had to go is replaced by the data-absent-reason ``masked``.
"""

from __future__ import annotations

from ..kanon import (
    AGE_GROUP_URL,
    BIRTH_PERIOD_URL,
    SUPPRESSED,
    TOP_LEVEL,
    Hierarchy,
    QuasiIdentifiers,
    Released,
    choose_levels,
    kanon_report,
    quasi_identifiers,
    released_quasi,
)
from .dates import shift_date
from .engine import KEY_SIZE, Deidentifier
from .profile import METHODS, Profile, Rule, load_profile
from .text import scrub_text, valid_resident_id

__all__ = [
    "AGE_GROUP_URL", "BIRTH_PERIOD_URL", "KEY_SIZE", "METHODS", "SUPPRESSED", "TOP_LEVEL", "Deidentifier",
    "Hierarchy", "Profile", "QuasiIdentifiers", "Released", "Rule", "choose_levels", "kanon_report",
    "load_profile", "quasi_identifiers", "released_quasi", "scrub_text", "shift_date", "valid_resident_id",
]
