"""The EMPI registry in the ledger state: the same assignment on every node, and curation round trips."""

import dataclasses
import json

from ehrnode import crypto, synthetic
from ehrnode.config import LEDGER_RULES
from ehrnode.consensus.types import Block
from ehrnode.empi.encoding import Encoder
from ehrnode.empi.normalize import Demographics
from ehrnode.ledger.empi_registry import scoped_enrolment as scoped
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction

from ..consensus.factory import Factory
from ..datasets import SYNTHEA
from .sealing import keyring, sealed

F = Factory()
KEYS = {name: crypto.Identity.generate() for name in ("A", "B", "R")}
MEMBERS = {name: key.public_key for name, key in KEYS.items()}
ROLES = {"A": "institution", "B": "institution", "R": "regulator"}
ENCODER = Encoder(b"k" * 32, oprf_key=0x5EED)
EPOCHS = keyring(F.vset.chain_id)


def tx(kind, body, submitter="A"):
    return Transaction.create(kind, body, chain_id=F.vset.chain_id, submitter=submitter,
                              identity=KEYS[submitter], time_ms=1)


def enrol(patient, institution, enrolment):
    encodings = ENCODER.encode(Demographics.from_fhir(patient))
    return tx("empi.enrol", {"epoch": 0, "enrolment": enrolment, "institution": institution,
                             "encodings": encodings.to_wire()}, institution)


class Chain:
    """One node's ledger state, fed blocks of transactions."""

    def __init__(self, path, rules=LEDGER_RULES):
        self.state = LedgerState(path, F.vset.chain_id, MEMBERS, roles=ROLES, keys=EPOCHS, rules=rules)
        self.height = 0

    def apply(self, *txs):
        self.height += 1
        block = Block.propose(epoch=0, round=self.height, qc=F.genesis_qc, author=1, timestamp=0,
                              payload=tuple(sealed(t, EPOCHS) for t in txs), identity=F.identities[1],
                              chain_id=F.vset.chain_id)
        # Every block here extends genesis; the state only needs heights to follow each other.
        self.state.apply(dataclasses.replace(block, height=self.height))
        return [self.state.tx_status(t.id) for t in txs]


def _typo(patient):
    """The same person as another registration clerk might type them in."""
    p = json.loads(json.dumps(patient))
    name = p["name"][0]
    family = name["family"]
    name["family"] = family[:2] + family[3] + family[2] + family[4:]  # two letters transposed
    name["given"] = list(reversed(name.get("given", [])))
    p["telecom"] = [{"system": "phone", "value": "555-000-1234"}]
    p["identifier"] = [i for i in p.get("identifier", []) if i.get("type", {}).get("coding", [{}])[0].get("code")
                       not in ("SS", "DL", "PPN")]
    return p


def test_the_same_people_at_two_institutions_get_one_empi_identically_on_two_nodes(tmp_path):
    patients = [json.loads(line) for line in (SYNTHEA / "Patient.ndjson").read_text().splitlines()]
    at_a = [enrol(p, "A", bytes([1, i]) * 8) for i, p in enumerate(patients)]
    # B registers the same people with typos, swapped given names, another phone and no SSN.
    at_b = [enrol(_typo(p), "B", bytes([2, i]) * 8) for i, p in enumerate(patients)]
    tables = []
    for node in ("n1", "n2"):
        chain = Chain(tmp_path / f"{node}.db")
        assert set(chain.apply(*at_a)) == {"ok"}
        assert set(chain.apply(*at_b)) == {"ok"}
        registry = chain.state.empi
        empis_a = [registry.empi_of(scoped("A", bytes([1, i]) * 8)) for i in range(len(patients))]
        empis_b = [registry.empi_of(scoped("B", bytes([2, i]) * 8)) for i in range(len(patients))]
        assert empis_a == empis_b
        assert len(set(empis_a)) == len(patients)
        tables.append(chain.state._db.execute("SELECT id, empi FROM enrolments ORDER BY id").fetchall())
        chain.state.close()
    assert tables[0] == tables[1]


def test_merge_and_unmerge_round_trip_and_records_follow(tmp_path):
    chain = Chain(tmp_path / "state.db")
    people = synthetic.people(4, seed=5)
    first = synthetic.patient_resources(people[0], "A")[0]
    second = synthetic.patient_resources(people[1], "B")[0]
    chain.apply(enrol(first, "A", b"a" * 16), enrol(second, "B", b"b" * 16))
    registry = chain.state.empi
    ea, eb = registry.empi_of(scoped("A", b"a" * 16)), registry.empi_of(scoped("B", b"b" * 16))
    assert ea != eb
    anchors = [tx("record.anchor", {
        "epoch": 0, "record": bytes([n]) * 16, "patient": patient, "institution": inst, "recorded_at": 86_400_000,
        "setting": "AMB", "resource_type": "Condition", "commitment": bytes([n]) * 32, "position": 1,
        "entry": bytes(32)}, inst) for n, patient, inst in ((1, b"a" * 16, "A"), (2, b"b" * 16, "B"))]
    assert chain.apply(*anchors) == ["ok", "ok"]
    assert len(chain.state.anchors(empi=ea)) == 1
    merge = tx("empi.merge", {"from": eb, "into": ea}, "B")
    assert chain.apply(merge) == ["ok"]
    # A holds a patient under ea: B's word alone merges nothing; A's agreement does.
    assert len(chain.state.anchors(empi=ea)) == 1
    assert [(r["kind"], r["requester"], r["waiting"]) for r in registry.requests()] == [("merge", "B", ["A"])]
    assert registry.requests("A") == registry.requests("B") == registry.requests()
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "B")) == ["invalid:own_request"]
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "A")) == ["ok"]
    assert registry.requests() == []
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "A")) == ["invalid:decided"]
    # Either id now lists the records of both.
    assert {a["record"] for a in chain.state.anchors(empi=ea)} == {bytes([1]) * 16, bytes([2]) * 16}
    assert chain.state.anchors(empi=eb) == chain.state.anchors(empi=ea)
    assert chain.apply(tx("empi.merge", {"from": eb, "into": ea}, "A")) == ["invalid:same"]
    # The anchors join A's and B's own enrolments (each institution names only its own).
    assert {a["patient"] for a in chain.state.anchors(empi=ea)} == {scoped("A", b"a" * 16), scoped("B", b"b" * 16)}
    assert chain.apply(tx("empi.unmerge", {"merge": merge.id}, "A")) == ["ok"]
    assert [a["record"] for a in chain.state.anchors(empi=ea)] == [bytes([1]) * 16]
    assert [a["record"] for a in chain.state.anchors(empi=eb)] == [bytes([2]) * 16]
    assert chain.apply(tx("empi.unmerge", {"merge": merge.id}, "A")) == ["invalid:undone"]
    events = [e["event"] for e in registry.history(ea)]
    assert events == ["created", "merge_requested", "accepted", "merged", "unmerged"]


def test_link_not_duplicate_and_refusals(tmp_path):
    chain = Chain(tmp_path / "state.db")
    people = synthetic.people(3, seed=8)
    p0 = synthetic.patient_resources(people[0], "A")[0]
    p1 = synthetic.patient_resources(people[1], "A")[0]
    chain.apply(enrol(p0, "A", b"x" * 16), enrol(p1, "A", b"y" * 16))
    registry = chain.state.empi
    x, y = scoped("A", b"x" * 16), scoped("A", b"y" * 16)
    ex, ey = registry.empi_of(x), registry.empi_of(y)
    # Only the owner links or splits its enrolment.
    assert chain.apply(tx("empi.link", {"enrolment": y, "empi": ex}, "B")) == ["invalid:not_owner"]
    assert chain.apply(tx("empi.link", {"enrolment": y, "empi": ex})) == ["ok"]
    assert registry.empi_of(y) == ex
    assert chain.apply(tx("empi.split", {"enrolment": y}, "B")) == ["invalid:not_owner"]
    split = tx("empi.split", {"enrolment": y})
    assert chain.apply(split) == ["ok"]
    ez = registry.empi_of(y)
    assert ez not in (ex, ey) and registry.enrolments_of(ex) == [x]
    assert [e["event"] for e in registry.history(ex)] == ["created", "linked", "split"]
    # B enrolling A's enrolment id (copied from gossip) is B's own enrolment: A's is untouched.
    assert chain.apply(enrol(p1, "B", b"x" * 16)) == ["ok"]
    assert registry.empi_of(x) == ex and registry.empi_of(scoped("B", b"x" * 16)) is not None
    assert chain.apply(
        tx("empi.enrol", {"epoch": 0, "enrolment": b"z" * 16, "institution": "A", "encodings": {"v": 99}}),
        tx("empi.enrol", {"epoch": 0, "enrolment": b"z" * 16, "institution": "B",
                          "encodings": ENCODER.encode(Demographics.from_fhir(p0)).to_wire()}),  # not the submitter
        tx("empi.link", {"enrolment": b"q" * 16, "empi": ey}),
        tx("empi.not_duplicate", {"a": x, "b": y}),
    ) == ["invalid:encodings", "invalid:not_owner", "invalid:unknown", "invalid:not_open"]


def test_unmerges_go_last_first_and_long_merge_chains_resolve(tmp_path):
    chain = Chain(tmp_path / "state.db")
    people = synthetic.people(70, seed=21)
    enrolments = [enrol(synthetic.patient_resources(p, "A")[0], "A", i.to_bytes(16, "big"))
                  for i, p in enumerate(people)]
    chain.apply(*enrolments)
    registry = chain.state.empi
    empis = [registry.empi_of(scoped("A", i.to_bytes(16, "big"))) for i in range(len(people))]
    assert len(set(empis)) == len(people)
    a, b, c = empis[:3]
    m1 = tx("empi.merge", {"from": a, "into": b})
    m2 = tx("empi.merge", {"from": b, "into": c})
    assert chain.apply(m1, m2) == ["ok", "ok"]
    assert chain.apply(tx("empi.unmerge", {"merge": m1.id})) == ["invalid:later_merge"]
    assert chain.apply(tx("empi.unmerge", {"merge": m2.id}), tx("empi.unmerge", {"merge": m1.id})) == ["ok", "ok"]
    assert [registry.enrolments_of(e) for e in (a, b, c)] == [
        [scoped("A", (i).to_bytes(16, "big"))] for i in range(3)]
    # A chain of 66 merges still resolves from its first EMPI.
    merges = [tx("empi.merge", {"from": empis[i], "into": empis[i + 1]}) for i in range(3, 69)]
    assert set(chain.apply(*merges)) == {"ok"}
    assert registry.resolve(None, empis[3]) == empis[69]
    assert len(registry.enrolments_of(empis[3])) == 67
    # B has no patient in either EMPI: it may not merge them.
    assert chain.apply(tx("empi.merge", {"from": empis[0], "into": empis[1]}, "B")) == ["invalid:not_owner"]


def test_a_regulator_cannot_enrol(tmp_path):
    chain = Chain(tmp_path / "state.db")
    patient = synthetic.patient_resources(synthetic.people(1, seed=1)[0], "R")[0]
    assert chain.apply(enrol(patient, "R", b"r" * 16)) == ["invalid:role"]


def _anchor(n, patient, institution):
    return tx("record.anchor", {
        "epoch": 0, "record": bytes([n]) * 16, "patient": patient, "institution": institution,
        "recorded_at": 86_400_000,
        "setting": "AMB", "resource_type": "Condition", "commitment": bytes([n]) * 32, "position": n,
        "entry": bytes(32)}, institution)


def test_a_member_cannot_join_its_enrolment_to_another_members_patient_alone(tmp_path):
    """B enrols a dummy patient and links it into A's patient's EMPI: held until A agrees."""
    chain = Chain(tmp_path / "state.db")
    people = synthetic.people(2, seed=9)
    real = synthetic.patient_resources(people[0], "A")[0]
    dummy = synthetic.patient_resources(people[1], "B")[0]
    assert chain.apply(enrol(real, "A", b"a" * 16), enrol(dummy, "B", b"d" * 16)) == ["ok", "ok"]
    assert chain.apply(_anchor(1, b"a" * 16, "A"), _anchor(2, b"d" * 16, "B")) == ["ok", "ok"]
    registry = chain.state.empi
    ea, d = registry.empi_of(scoped("A", b"a" * 16)), scoped("B", b"d" * 16)
    link = tx("empi.link", {"enrolment": d, "empi": ea}, "B")
    assert chain.apply(link) == ["ok"]
    assert registry.empi_of(d) != ea and registry.institutions_of(ea) == {"A"}
    assert [e["event"] for e in registry.history(ea)] == ["created", "link_requested"]
    # Neither the requester nor an institution outside the EMPI can agree for A.
    assert chain.apply(tx("empi.accept", {"request": link.id}, "B")) == ["invalid:own_request"]
    assert chain.apply(tx("empi.accept", {"request": link.id}, "R")) == ["invalid:role"]
    assert chain.apply(tx("empi.accept", {"request": bytes(32)}, "A")) == ["invalid:unknown_request"]
    # A merge of B's dummy EMPI into A's patient is held the same way.
    merge = tx("empi.merge", {"from": registry.empi_of(d), "into": ea}, "B")
    assert chain.apply(merge) == ["ok"] and registry.empi_of(d) != ea
    assert {r["kind"] for r in registry.requests("A")} == {"link", "merge"}
    # A agrees to the link: it takes effect; the merge is now moot (one EMPI).
    assert chain.apply(tx("empi.accept", {"request": link.id}, "A")) == ["ok"]
    assert registry.empi_of(d) == ea and registry.institutions_of(ea) == {"A", "B"}
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "A")) == ["invalid:stale"]


def test_a_certain_match_links_at_once_and_a_merge_needs_every_other_holder(tmp_path):
    chain = Chain(tmp_path / "state.db")
    people = synthetic.people(3, seed=10)
    p0, p1 = (synthetic.patient_resources(p, "A")[0] for p in people[:2])
    p1_at_b = dict(synthetic.patient_resources(people[1], "B")[0])
    assert chain.apply(enrol(p0, "A", b"a" * 16), enrol(p1, "A", b"b" * 16)) == ["ok", "ok"]
    registry = chain.state.empi
    e0, e1 = registry.empi_of(scoped("A", b"a" * 16)), registry.empi_of(scoped("A", b"b" * 16))
    # B enrols the same person as A's second patient, then splits it off: a link back is a
    # certain match (same national id), so it needs nobody's agreement.
    assert chain.apply(enrol(p1_at_b, "B", b"c" * 16)) == ["ok"]
    c = scoped("B", b"c" * 16)
    assert registry.empi_of(c) == e1
    assert chain.apply(tx("empi.split", {"enrolment": c}, "B")) == ["ok"]
    assert chain.apply(tx("empi.link", {"enrolment": c, "empi": e1}, "B")) == ["ok"]
    assert registry.empi_of(c) == e1 and registry.requests() == []
    # A alone under e0, A and B under e1: A's merge waits for B.
    merge = tx("empi.merge", {"from": e0, "into": e1})
    assert chain.apply(merge) == ["ok"]
    assert [r["waiting"] for r in registry.requests()] == [["B"]]
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "B")) == ["ok"]
    assert registry.resolve(None, e0) == e1


def test_the_aliases_of_an_empi_are_found_without_reading_every_empi(tmp_path):
    """Every pull's consent check asks for a patient's aliases: SQLite's own count of the steps
    that takes does not grow with the number of patients in the registry."""
    chain = Chain(tmp_path / "state.db")
    registry, db = chain.state.empi, chain.state._db
    db.executemany("INSERT INTO empis VALUES (?, 1, NULL)", [(f"E{n}",) for n in range(3)])
    db.execute("UPDATE empis SET merged_into = 'E0' WHERE empi = 'E1'")
    steps = []

    def count() -> None:
        steps[-1] += 1

    for more in (10, 5_000):
        db.executemany("INSERT OR IGNORE INTO empis VALUES (?, 1, NULL)", [(f"X{n}",) for n in range(more)])
        steps.append(0)
        db.set_progress_handler(count, 10)
        assert registry.aliases("E1") == ["E0", "E1"]
        db.set_progress_handler(None, 0)
    assert 0 < steps[1] < 1.5 * steps[0], steps

