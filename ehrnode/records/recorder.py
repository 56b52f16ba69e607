"""Recording: from validated FHIR input to vault entries and their anchor transactions.

Theory of operation
-------------------
:meth:`Recorder.record` takes one whole input (every resource of every file a
user named) and either records all of it or nothing:

1. validate each resource; set aside non-patient resources (Organization,
   Practitioner, Location, ...), which are not records;
2. resolve each resource's patient: a Patient in the same input or one this
   node recorded before; a resource whose patient is neither is refused;
3. with problems and no ``skip_invalid``, raise FhirError listing them all,
   having written nothing; with ``skip_invalid``, drop the invalid resources
   and everything that depends on a dropped Patient, and report them;
4. give each patient its enrolment id (this institution's pseudonym for it) and,
   for each Patient recorded, an ``empi.enrol`` transaction with its keyed
   encodings: the chain decides the EMPI (``ledger/empi_registry.py``); choose
   the k-anonymity level of each patient's quasi-identifiers when the profile asks;
5. de-identify each resource, salt it, commit to it and encrypt it (for a
   large input, in worker processes: workers.py, with its validation), and
   seal its vault entry for the next position (link, sign, wrap its keys) as
   its release comes back, while the workers release the rest;
6. append everything to the vault in one transaction, with the enrolments and
   signed ``record.anchors`` transactions in the vault's outbox, each anchoring up
   to ``MAX_ANCHORS`` entries.

Steps 1-5 are :meth:`Recorder.prepare` and step 6 :meth:`Recorder.write`: the
node asks for the OPRF outputs the enrolments need while the first runs.

A resource recorded before with identical content is not recorded again (so
re-running an ingest after a failure is harmless); changed content is a new
record. The caller admits the returned anchors to the mempool; anything not
admitted stays in the outbox and is offered again.

Blocking and CPU-bound: the node runs it in a worker thread, one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import crypto
from ..config import LEDGER_RULES
from ..empi.encoding import Encoder
from ..empi.normalize import Demographics
from ..errors import FhirError
from ..ledger.transactions import ENROLMENT_SIZE, MAX_ANCHORS, SINCE_RULES, Transaction, recorded_day
from . import deid as deid_module
from . import fhir
from .deid import Deidentifier
from .deid.notes import PatientFacts
from .keys import RecordKeys
from .vault import NewEntry, PatientRow, SealedEntry, StoredEntry, Vault, Write
from .workers import Checked, Preparer, Released, released

#: Shown problems per failed ingest; the rest are counted.
MAX_PROBLEMS_SHOWN = 50
#: HL7 v3 ActEncounterCode: the settings an anchor may name.
ENCOUNTER_CLASSES = frozenset({"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"})


@dataclass(frozen=True)
class Recorded:
    record_id: str
    patient: str  # the patient's enrolment id (hex); its EMPI is decided on chain
    resource_type: str
    source: str
    position: int
    tx_id: str | None
    status: str  # "recorded" | "already_recorded"

    def view(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "patient": self.patient, "resource_type": self.resource_type,
                "source": self.source, "position": self.position, "tx_id": self.tx_id, "status": self.status}


@dataclass
class Outcome:
    records: list[Recorded] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: New transactions in the order they must be offered: enrolments, then anchors.
    transactions: list[Transaction] = field(default_factory=list)


@dataclass
class _Candidate:
    """An input resource on its way to the vault."""

    item: fhir.Item
    patient_id: str | None
    #: The resource's canonical JSON (what the vault keeps), from validation.
    raw: bytes
    #: The canonical JSON of its release (what the commitment is over), once de-identified.
    release: bytes | None = None
    #: Its vault entry, once released.
    entry: NewEntry | None = None
    problem: fhir.Problem | None = None
    version_key: bytes = b""
    digest: bytes = b""

    @property
    def pid(self) -> str:
        """The patient's id, once resolved (a candidate without one has a problem and is gone)."""
        assert self.patient_id is not None
        return self.patient_id


@dataclass
class _Patient:
    lookup: bytes
    enrolment: bytes
    resource: dict[str, Any]


@dataclass
class Prepared:
    """An input validated and de-identified, ready to write (:meth:`Recorder.prepare`)."""

    outcome: Outcome  # what is known already: content recorded before, what is skipped
    candidates: list[_Candidate]
    patients: dict[str, _Patient]
    now_ms: int  # the day recorded
    #: The candidates' vault entries sealed for the positions after the vault's head (none if a
    #: release failed: what is recorded is then made again without it).
    sealed: list[SealedEntry]


class Recorder:
    def __init__(self, *, vault: Vault, keys: RecordKeys, deidentifier: Deidentifier, institution: str,
                 chain_id: str, member: crypto.MemberKeys, epoch: int = 0, preparer: Preparer | None = None,
                 encoder: Encoder | None = None, rules: int = LEDGER_RULES) -> None:
        self.vault = vault
        self.keys = keys
        self.deid = deidentifier
        # Validation and de-identification; in this thread unless a pool of processes is given.
        self.preparer = preparer or Preparer(deidentifier, None, b"", workers=0)
        self.encoder = encoder or Encoder(keys.consortium)
        self.institution = institution
        self.chain_id = chain_id
        self.member = member
        self.epoch = epoch
        # A chain of ledger rules 1 knows no record.anchors: one record.anchor a record there.
        self.anchors_per_tx = MAX_ANCHORS if rules >= SINCE_RULES["record.anchors"] else 0

    # --- the pipeline -------------------------------------------------------------------

    def record(self, items: Sequence[fhir.Item], *, skip_invalid: bool = False, now_ms: int,
               actor: bytes = b"", evaluated: Mapping[bytes, bytes] | None = None) -> Outcome:
        """Record ``items`` atomically; raises FhirError (nothing written) on invalid input.

        ``evaluated``: the OPRF outputs the enrolments of the Patients among ``items`` need
        (:meth:`oprf_inputs`); MissingEvaluation if one is not there.

        In two steps, :meth:`prepare` then :meth:`write`: a caller may get the OPRF outputs
        while the first runs (the vault must not change between the two)."""
        return self.write(self.prepare(items, skip_invalid=skip_invalid, now_ms=now_ms), actor=actor,
                          evaluated=evaluated)

    def prepare(self, items: Sequence[fhir.Item], *, skip_invalid: bool = False, now_ms: int,
                checked: Sequence[Checked] = ()) -> Prepared:
        """Everything of recording ``items`` but writing; raises FhirError on invalid input.

        ``checked``: what :meth:`check` found of the first ``len(checked)`` items, when they were
        validated already (while the rest of the input was still arriving); the rest are
        validated here.

        In stages: validate the input and find each resource's patient; set aside content
        recorded before; de-identify what is left, sealing each vault entry as its release comes
        back; refuse the whole input if anything failed (unless ``skip_invalid``). What goes on
        chain carries only the day of ``now_ms`` (see ``recorded_day``)."""
        now_ms = recorded_day(now_ms)
        outcome = Outcome()
        problems: list[fhir.Problem] = []
        candidates, patients = self._validate(items, outcome, problems, checked)
        candidates = self._fresh(candidates, patients, outcome)
        sealed = self._release(candidates, patients, problems, now_ms)
        if problems and not skip_invalid:
            shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
            extra = len(problems) - MAX_PROBLEMS_SHOWN
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            raise FhirError(f"{len(problems)} invalid resource(s); nothing was recorded "
                            f"(--skip-invalid records the rest):\n{shown}{more}", reason="invalid_input")
        outcome.skipped.extend(_skip_problem(p) for p in problems)
        # A Patient that could not be released takes its other resources along.
        unreleased = {c.patient_id for c in candidates if c.problem and c.item.resource["resourceType"] == "Patient"}
        for c in candidates:
            if c.problem is None and c.patient_id in unreleased:
                c.problem = _problem(c.item, f"belongs to Patient/{c.patient_id}, which was not recorded")
                outcome.skipped.append(_skip_problem(c.problem))
        return Prepared(outcome, [c for c in candidates if c.problem is None], patients, now_ms, sealed)

    def write(self, prepared: Prepared, *, actor: bytes = b"", evaluated: Mapping[bytes, bytes] | None = None,
              ) -> Outcome:
        """Write what :meth:`prepare` made of an input: the vault entries and their anchors (and
        the enrolments of its Patients) in one step."""
        outcome = prepared.outcome
        candidates = prepared.candidates
        if not prepared.sealed:
            # A release failed: what is recorded is made again without it (the setting of a
            # resource may have come from an encounter left out).
            settings = self._settings([c.item for c in candidates])
            for c, setting in zip(candidates, settings, strict=True):
                c.entry = self._new_entry(c, prepared.patients[c.pid], setting, prepared.now_ms)
        self._write(candidates, prepared.patients, outcome, prepared.now_ms, actor, evaluated, prepared.sealed)
        return outcome

    def check(self, items: Sequence[fhir.Item]) -> list[Checked]:
        """Validate ``items`` alone (nothing else is read or written: any thread, any time), for
        :meth:`prepare` to be given later as ``checked``."""
        return self.preparer.validate(items)

    def _validate(self, items: Sequence[fhir.Item], outcome: Outcome, problems: list[fhir.Problem],
                  checked_before: Sequence[Checked] = ()) -> tuple[list[_Candidate], dict[str, _Patient]]:
        """The valid patient data of ``items``, each with its patient resolved; problems and
        skipped items noted."""
        if len(checked_before) > len(items):
            raise ValueError("more validation results than items")
        results = [*checked_before, *self.preparer.validate(items[len(checked_before):])]
        candidates: list[_Candidate] = []
        invalid_patients: set[str] = set()
        seen: set[tuple[str, str]] = set()
        for item, checked in zip(items, results, strict=True):
            problem = None if isinstance(checked, bytes) else checked
            if problem is None:
                key = (item.resource["resourceType"], item.resource["id"])
                if key in seen:
                    problem = _problem(item, f"{key[0]}/{key[1]} appears twice in this input")
                seen.add(key)
            if problem is not None:
                problems.append(problem)
                if isinstance(item.resource, dict) and item.resource.get("resourceType") == "Patient":
                    invalid_patients.add(str(item.resource.get("id")))
            elif not fhir.is_patient_data(item.resource):
                outcome.skipped.append(_skip(item, "not patient data (not recorded)"))
            else:
                assert isinstance(checked, bytes)
                candidates.append(_Candidate(item, fhir.patient_id(item.resource), raw=checked))
        patients = self._resolve_patients(candidates, problems, invalid_patients)
        return [c for c in candidates if c.problem is None], patients

    def _fresh(self, candidates: list[_Candidate], patients: dict[str, _Patient], outcome: Outcome) -> list[_Candidate]:
        """The candidates whose content was not recorded before (those are reported, not recorded again)."""
        fresh = []
        for c in candidates:
            resource = c.item.resource
            c.version_key = self.keys.lookup("version", resource["resourceType"], resource["id"])
            c.digest = self.keys.lookup("content", c.raw.decode("utf-8"))
            known = self.vault.version(c.version_key)
            if known is not None and known[0] == c.digest:
                entry = self.vault.entry(known[1])
                outcome.records.append(Recorded(
                    known[1].hex(), patients[c.pid].enrolment.hex(), resource["resourceType"],
                    c.item.source, entry.header.position if entry else 0, None, "already_recorded",
                ))
            else:
                fresh.append(c)
        return fresh

    def _release(self, candidates: list[_Candidate], patients: dict[str, _Patient],
                 problems: list[fhir.Problem], now_ms: int) -> list[SealedEntry]:
        """De-identify each candidate (``c.release``, and its vault entry ``c.entry``), or note why
        it cannot be released (``c.problem``). While the workers release the rest, the entries are
        sealed for the positions after the vault's head, in order; returns them, or none if a
        release failed (the candidates after it would take other positions)."""
        levels = self._levels(patients, {c.item.resource["id"] for c in candidates
                                         if c.item.resource["resourceType"] == "Patient"})
        facts = {pid: PatientFacts.of(patients[pid].resource) for pid in {c.pid for c in candidates}}
        settings = self._settings([c.item for c in candidates])
        position, prev = self.vault.head()
        sealed: list[SealedEntry] = []
        releases = self.preparer.deidentify(
            [(c.raw, c.pid, levels.get(c.pid, 0), facts[c.pid]) for c in candidates])
        failed = False
        for c, setting, release in zip(candidates, settings, releases, strict=True):
            if isinstance(release, str):
                c.problem = _problem(c.item, f"cannot be released safely: {release}")
                problems.append(c.problem)
                failed = True
                continue
            c.release = release.release
            if failed:
                continue  # the entries are made again without the failed release (write)
            c.entry = self._new_entry(c, patients[c.pid], setting, now_ms, release)
            position += 1
            sealed.append(self.vault.seal(c.entry, position, prev))
            prev = sealed[-1].stored.hash
        return [] if failed else sealed

    @staticmethod
    def _new_entry(c: _Candidate, patient: _Patient, setting: str, now_ms: int,
                   made: Released | None = None) -> NewEntry:
        """The vault entry of a released candidate, from what the workers ``made`` of it (else
        made here): a new record id, its salted commitment, both encrypted."""
        if made is None:
            assert c.release is not None
            made = released(c.raw, c.release)
        return NewEntry(made.record_id, c.item.resource["resourceType"], patient.enrolment, setting, now_ms,
                        made.commitment, c.raw, made.payload, made.encrypted)

    def _write(self, candidates: list[_Candidate], patients: dict[str, _Patient], outcome: Outcome, now_ms: int,
               actor: bytes, evaluated: Mapping[bytes, bytes] | None, sealed: list[SealedEntry]) -> None:
        """Append the released candidates to the vault with their anchors (and enrolments), in one write."""
        write = Write(sealed=sealed)
        pending: list[tuple[fhir.Item, _Patient, bytes]] = []
        for c in candidates:
            item, resource, patient, entry = c.item, c.item.resource, patients[c.pid], c.entry
            assert entry is not None and c.release is not None
            write.entries.append(entry)
            write.versions[c.version_key] = (c.digest, entry.record_id)
            if resource["resourceType"] == "Encounter":
                write.encounters[self.keys.lookup("encounter", resource["id"])] = entry.setting
            if resource["resourceType"] == "Patient":
                write.patients.append(PatientRow(
                    patient.lookup, patient.enrolment, resource,
                    tuple(deid_module.released_quasi(json.loads(c.release))),
                ))
                enrol = self._enrolment(patient, now_ms, actor, evaluated)
                write.before.append((enrol.id, enrol.encoded))
                outcome.transactions.append(enrol)
            pending.append((item, patient, entry.record_id))

        anchors: dict[bytes, Transaction] = {}  # record -> the transaction anchoring it

        def anchor(entry: StoredEntry) -> dict[str, Any]:
            h = entry.header
            return {"record": h.record_id, "patient": h.patient, "recorded_at": h.recorded_at, "setting": h.setting,
                    "resource_type": h.resource_type, "commitment": h.commitment, "position": h.position,
                    "entry": entry.hash}

        def make_anchors(stored: list[StoredEntry]) -> list[tuple[bytes, bytes]]:
            shared = {"epoch": self.epoch, "institution": self.institution}
            if self.anchors_per_tx:
                chunks = [stored[i:i + self.anchors_per_tx] for i in range(0, len(stored), self.anchors_per_tx)]
                bodies = [("record.anchors", {**shared, "anchors": [anchor(e) for e in chunk]}, chunk)
                          for chunk in chunks]
            else:
                bodies = [("record.anchor", {**shared, **anchor(e)}, [e]) for e in stored]
            made = []
            for kind, body, chunk in bodies:
                tx = Transaction.create(kind, body, chain_id=self.chain_id, submitter=self.institution,
                                        identity=self.member.identity, time_ms=now_ms, actor=actor)
                anchors.update((e.header.record_id, tx) for e in chunk)
                made.append((tx.id, tx.encoded))
            return made

        stored = self.vault.append(write, make_anchors) if write.entries else []
        for (item, patient, record_id), done in zip(pending, stored, strict=True):
            tx = anchors[record_id]
            outcome.records.append(Recorded(
                record_id.hex(), patient.enrolment.hex(), item.resource["resourceType"], item.source,
                done.header.position, tx.id.hex(), "recorded",
            ))
        outcome.transactions.extend({tx.id: tx for tx in anchors.values()}.values())

    def _resolve_patients(self, candidates: list[_Candidate], problems: list[fhir.Problem],
                          invalid_patients: set[str]) -> dict[str, _Patient]:
        """The patient of every candidate; a candidate without one gets its problem."""
        patients: dict[str, _Patient] = {}
        for c in candidates:
            resource = c.item.resource
            if resource["resourceType"] == "Patient":
                lookup = self.keys.lookup("patient", resource["id"])
                patients[resource["id"]] = _Patient(lookup, self.enrolment_id(resource["id"]), resource)
        for c in candidates:
            if c.patient_id is None:
                c.problem = _problem(c.item, "does not reference the Patient it belongs to")
            elif c.patient_id in patients:
                continue
            elif c.patient_id in invalid_patients:
                c.problem = _problem(c.item, f"belongs to Patient/{c.patient_id}, which is invalid")
            else:
                known = self.vault.patient(self.keys.lookup("patient", c.patient_id))
                if known is not None:
                    patients[c.patient_id] = _Patient(known.lookup, known.enrolment, known.resource)
                    continue
                c.problem = _problem(
                    c.item, f"references Patient/{c.patient_id}, which is neither in this input nor recorded here")
            problems.append(c.problem)
        return patients

    def enrolment_id(self, patient_id: str) -> bytes:
        """This institution's pseudonym for one of its patients: stable, and meaningless elsewhere."""
        return self.keys.lookup("enrolment", patient_id)[:ENROLMENT_SIZE]

    def oprf_inputs(self, items: Sequence[fhir.Item]) -> list[bytes]:
        """The OPRF inputs enrolling the Patients among ``items`` may need (an item that is no
        Patient one can read demographics from adds nothing: it is refused later, or not enrolled)."""
        inputs: list[bytes] = []
        for item in items:
            resource = item.resource
            if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                try:
                    demo = Demographics.from_fhir(resource)
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
                inputs.extend(self.encoder.inputs(demo))
        return inputs

    def _enrolment(self, patient: _Patient, now_ms: int, actor: bytes,
                   evaluated: Mapping[bytes, bytes] | None) -> Transaction:
        """The ``empi.enrol`` transaction of a Patient being recorded: keyed encodings only."""
        encodings = self.encoder.encode(Demographics.from_fhir(patient.resource), evaluated)
        return Transaction.create("empi.enrol", {
            "epoch": self.epoch, "enrolment": patient.enrolment, "institution": self.institution,
            "encodings": encodings.to_wire(),
        }, chain_id=self.chain_id, submitter=self.institution, identity=self.member.identity, time_ms=now_ms,
            actor=actor)

    def _levels(self, patients: dict[str, _Patient], releasing: set[str]) -> dict[str, int]:
        """k-anonymity levels for the Patients released now (``releasing``).

        Patients released before keep the values they released; those values count
        towards every class, so a class formed now reaches k with them.
        """
        if self.deid.profile.k <= 1 or not releasing:
            return {}
        population = {pid: deid_module.quasi_identifiers(patients[pid].resource) for pid in releasing}
        released = {pid: value for pid, value in self.vault.released().items() if pid not in releasing}
        return self.deid.choose_levels(population, released=released)

    def _settings(self, items: list[fhir.Item]) -> list[str]:
        """Each item's setting: its own encounter class, or that of the encounter it refers to."""
        by_encounter = {item.resource["id"]: _clean_setting(fhir.setting_of(item.resource))
                        for item in items if item.resource["resourceType"] == "Encounter"}
        settings = []
        for item in items:
            resource = item.resource
            if resource["resourceType"] == "Encounter":
                settings.append(by_encounter[resource["id"]])
                continue
            encounter = fhir.encounter_id(resource)
            setting = by_encounter.get(encounter) if encounter else None
            if setting is None and encounter:
                setting = self.vault.setting(self.keys.lookup("encounter", encounter))
            settings.append(setting or _clean_setting(fhir.setting_of(resource)))
        return settings

def _clean_setting(value: str | None) -> str:
    """The setting as it may go on chain: a known encounter class, ``unknown``, or ``other``.

    Only codes from a fixed list leave the institution: a code field can hold anything a
    sender put there, a phone number or a name included.
    """
    if not value or value == "unknown":
        return "unknown"
    code = value.upper()
    return code if code in ENCOUNTER_CLASSES else "other"


def _problem(item: fhir.Item, message: str) -> fhir.Problem:
    resource = item.resource
    return fhir.Problem(item.source, resource.get("resourceType"), resource.get("id"), None, message)


def _skip(item: fhir.Item, reason: str) -> dict[str, Any]:
    return {"source": item.source, "resource_type": item.resource.get("resourceType"),
            "id": item.resource.get("id"), "reason": reason}


def _skip_problem(problem: fhir.Problem) -> dict[str, Any]:
    return {"source": problem.source, "resource_type": problem.resource_type, "id": problem.resource_id,
            "reason": str(problem)}
