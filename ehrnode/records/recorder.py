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
4. give each new patient its EMPI (one call: :func:`assign_empi`); choose the
   k-anonymity level of each patient's quasi-identifiers when the profile asks;
5. de-identify each resource, salt it and commit to it;
6. append everything to the vault in one transaction, with one signed
   ``record.anchor`` transaction per entry in the vault's outbox.

A resource recorded before with identical content is not recorded again (so
re-running an ingest after a failure is harmless); changed content is a new
record. The caller admits the returned anchors to the mempool; anything not
admitted stays in the outbox and is offered again.

Blocking and CPU-bound: the node runs it in a worker thread, one at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import codec, crypto
from ..empi.assign import assign_empi
from ..errors import DeidentificationError, FhirError
from ..ledger.transactions import Transaction
from . import deid as deid_module
from . import fhir
from .canonical import canonical_json, commitment, new_salt
from .deid import Deidentifier
from .keys import RecordKeys
from .vault import RECORD_ID_SIZE, EntryHeader, NewEntry, PatientRow, Vault, Write

#: Shown problems per failed ingest; the rest are counted.
MAX_PROBLEMS_SHOWN = 50
_SETTING = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Recorded:
    record_id: str
    empi: str
    resource_type: str
    source: str
    position: int
    tx_id: str | None
    status: str  # "recorded" | "already_recorded"

    def view(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "empi": self.empi, "resource_type": self.resource_type,
                "source": self.source, "position": self.position, "tx_id": self.tx_id, "status": self.status}


@dataclass
class Outcome:
    records: list[Recorded] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    anchors: list[Transaction] = field(default_factory=list)


@dataclass
class _Patient:
    lookup: bytes
    empi: str
    resource: dict[str, Any]
    new: bool


class Recorder:
    def __init__(self, *, vault: Vault, keys: RecordKeys, deidentifier: Deidentifier, institution: str,
                 chain_id: str, identity: crypto.Identity, epoch: int = 0) -> None:
        self.vault = vault
        self.keys = keys
        self.deid = deidentifier
        self.institution = institution
        self.chain_id = chain_id
        self.identity = identity
        self.epoch = epoch

    # --- the pipeline -------------------------------------------------------------------

    def record(self, items: Sequence[fhir.Item], *, skip_invalid: bool = False, now_ms: int) -> Outcome:
        """Record ``items`` atomically; raises FhirError (nothing written) on invalid input."""
        outcome = Outcome()
        problems: list[fhir.Problem] = []
        accepted: list[fhir.Item] = []
        seen: set[tuple[str, str]] = set()
        for item in items:
            problem = fhir.validate(item)
            if problem is None:
                key = (item.resource["resourceType"], item.resource["id"])
                if key in seen:
                    problem = _problem(item, f"{key[0]}/{key[1]} appears twice in this input")
                seen.add(key)
            if problem is not None:
                problems.append(problem)
            elif not fhir.is_patient_data(item.resource):
                outcome.skipped.append(_skip(item, "not patient data (not recorded)"))
            else:
                accepted.append(item)

        patients = self._resolve_patients(accepted, problems)
        bad = {p.source for p in problems}
        levels = self._levels(patients, {item.resource["id"] for item in accepted
                                         if item.resource["resourceType"] == "Patient" and item.source not in bad})
        releases: dict[str, dict[str, Any]] = {}
        for item in accepted:
            if item.source in bad:
                continue
            patient = patients[_patient_of(item.resource)]
            try:
                releases[item.source] = self.deid.deidentify(
                    item.resource, patient=patient.resource["id"], level=levels.get(patient.resource["id"], 0))
            except DeidentificationError as exc:
                problems.append(_problem(item, f"cannot be released safely: {exc}"))
        if problems and not skip_invalid:
            shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
            more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
            raise FhirError(f"{len(problems)} invalid resource(s); nothing was recorded "
                            f"(--skip-invalid records the rest):\n{shown}{more}", reason="invalid_input")
        outcome.skipped.extend(_skip_problem(p) for p in problems)
        bad = {p.source for p in problems}
        accepted = [item for item in accepted if item.source not in bad]

        settings = self._settings(accepted)
        write = Write()
        pending: list[tuple[fhir.Item, _Patient, bytes]] = []
        for item in accepted:
            resource = item.resource
            patient = patients[_patient_of(resource)]
            raw = canonical_json(resource)
            version_key = self.keys.lookup("version", resource["resourceType"], resource["id"])
            digest = self.keys.lookup("content", raw.decode("utf-8"))
            known = self.vault.version(version_key)
            if known is not None and known[0] == digest:
                entry = self.vault.entry(known[1])
                outcome.records.append(Recorded(
                    known[1].hex(), entry.header.empi if entry else patient.empi, resource["resourceType"],
                    item.source, entry.header.position if entry else 0, None, "already_recorded",
                ))
                continue
            released = releases[item.source]
            canonical = canonical_json(released)
            salt = new_salt()
            record_id = os.urandom(RECORD_ID_SIZE)
            write.entries.append(NewEntry(
                record_id, resource["resourceType"], patient.empi, settings.get(item.source, "unknown"), now_ms,
                commitment(salt, canonical), raw, codec.encode({"salt": salt, "resource": canonical}),
            ))
            write.versions[version_key] = (digest, record_id)
            if resource["resourceType"] == "Encounter":
                write.encounters[self.keys.lookup("encounter", resource["id"])] = settings[item.source]
            if resource["resourceType"] == "Patient":
                write.patients.append(PatientRow(
                    patient.lookup, patient.empi, resource, tuple(deid_module.released_quasi(released)),
                ))
            pending.append((item, patient, record_id))

        anchors: dict[bytes, Transaction] = {}

        def make_anchor(header: EntryHeader, entry_hash: bytes) -> tuple[bytes, bytes]:
            tx = Transaction.create("record.anchor", {
                "epoch": self.epoch, "record": header.record_id, "empi": header.empi,
                "institution": self.institution, "recorded_at": header.recorded_at, "setting": header.setting,
                "resource_type": header.resource_type, "commitment": header.commitment,
                "position": header.position, "entry": entry_hash,
            }, chain_id=self.chain_id, submitter=self.institution, identity=self.identity, time_ms=now_ms)
            anchors[header.record_id] = tx
            return tx.id, tx.encoded

        stored = self.vault.append(write, make_anchor) if write.entries else []
        for (item, patient, record_id), entry in zip(pending, stored, strict=True):
            tx = anchors[record_id]
            outcome.records.append(Recorded(
                record_id.hex(), patient.empi, item.resource["resourceType"], item.source, entry.header.position,
                tx.id.hex(), "recorded",
            ))
            outcome.anchors.append(tx)
        return outcome

    def _resolve_patients(self, accepted: list[fhir.Item], problems: list[fhir.Problem]) -> dict[str, _Patient]:
        """Every patient the accepted items belong to; adds a problem for each that has none."""
        patients: dict[str, _Patient] = {}
        for item in accepted:
            if item.resource["resourceType"] == "Patient":
                resource = item.resource
                lookup = self.keys.lookup("patient", resource["id"])
                known = self.vault.patient(lookup)
                empi = known.empi if known else assign_empi(resource, key=self.keys.consortium,
                                                            institution=self.institution)
                patients[resource["id"]] = _Patient(lookup, empi, resource, known is None)
        failed = {p.source for p in problems}
        for item in accepted:
            if item.source in failed:
                continue
            patient_id = _patient_of(item.resource)
            if patient_id is None:
                problems.append(_problem(item, "does not reference the Patient it belongs to"))
                continue
            if patient_id in patients:
                continue
            known = self.vault.patient(self.keys.lookup("patient", patient_id))
            if known is None:
                problems.append(_problem(
                    item, f"references Patient/{patient_id}, which is neither in this input nor recorded here"))
                continue
            patients[patient_id] = _Patient(known.lookup, known.empi, known.resource, False)
        # A skipped Patient takes the resources that belong to it along.
        dropped = {_patient_of(p_item.resource) for p_item in accepted
                   if p_item.source in {p.source for p in problems} and p_item.resource.get("resourceType") == "Patient"}
        for item in accepted:
            if item.source not in {p.source for p in problems} and _patient_of(item.resource) in dropped:
                problems.append(_problem(item, f"belongs to Patient/{_patient_of(item.resource)}, which is invalid"))
        return patients

    def _levels(self, patients: dict[str, _Patient], releasing: set[str]) -> dict[str, int]:
        """k-anonymity levels for the Patients released now (``releasing``).

        Patients released before keep the values they released; those values count
        towards every class, so a class formed now reaches k with them.
        """
        if self.deid.profile.k <= 1 or not releasing:
            return {}
        population = {pid: deid_module.quasi_identifiers(patients[pid].resource) for pid in releasing}
        released = {row.resource["id"]: row.released for row in self.vault.patients()
                    if row.resource["id"] not in releasing}
        return self.deid.choose_levels(population, released=released)

    def _settings(self, items: list[fhir.Item]) -> dict[str, str]:
        """Each item's setting: its own encounter class, or that of the encounter it refers to."""
        by_encounter = {item.resource["id"]: _clean_setting(fhir.setting_of(item.resource))
                        for item in items if item.resource["resourceType"] == "Encounter"}
        settings = {}
        for item in items:
            resource = item.resource
            if resource["resourceType"] == "Encounter":
                settings[item.source] = by_encounter[resource["id"]]
                continue
            encounter = fhir.encounter_id(resource)
            setting = by_encounter.get(encounter) if encounter else None
            if setting is None and encounter:
                setting = self.vault.setting(self.keys.lookup("encounter", encounter))
            settings[item.source] = setting or _clean_setting(fhir.setting_of(resource))
        return settings


def _patient_of(resource: dict[str, Any]) -> str | None:
    return fhir.patient_id(resource)


def _clean_setting(value: str | None) -> str:
    text = _SETTING.sub("", value or "")[:32]
    return text or "unknown"


def _problem(item: fhir.Item, message: str) -> fhir.Problem:
    resource = item.resource
    return fhir.Problem(item.source, resource.get("resourceType"), resource.get("id"), None, message)


def _skip(item: fhir.Item, reason: str) -> dict[str, Any]:
    return {"source": item.source, "resource_type": item.resource.get("resourceType"),
            "id": item.resource.get("id"), "reason": reason}


def _skip_problem(problem: fhir.Problem) -> dict[str, Any]:
    return {"source": problem.source, "resource_type": problem.resource_type, "id": problem.resource_id,
            "reason": str(problem)}
