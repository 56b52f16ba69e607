"""The vault: append-only, hash-linked, signed, encrypted; every kind of tampering is found."""

import sqlite3
from dataclasses import replace

import pytest

from ehrnode import codec, crypto
from ehrnode.errors import IntegrityError, StoreError
from ehrnode.records.canonical import canonical_json, commitment, new_salt
from ehrnode.records.keys import RecordKeys
from ehrnode.records.vault import NewEntry, PatientRow, Vault, Write, encrypt

KEYS = RecordKeys.derive(bytes(range(32)), bytes(32))
IDENTITY = crypto.Identity.from_seed(b"v" * 32)
MEMBER = crypto.MemberKeys(IDENTITY, crypto.SealingKey.generate())


def _entry(n: int) -> NewEntry:
    resource = {"resourceType": "Condition", "id": f"c{n}", "code": {"text": f"condition {n}"}}
    released = {"resourceType": "Condition", "id": f"p{n}"}
    salt = new_salt()
    canonical = canonical_json(released)
    return NewEntry(
        record_id=n.to_bytes(16, "big"), resource_type="Condition", patient=b"p" * 16, setting="AMB",
        recorded_at=1_700_000_000_000 + n, commitment=commitment(salt, canonical), raw=canonical_json(resource),
        release=codec.encode({"salt": salt, "resource": canonical}),
    )


def _no_anchor(stored):
    return [(entry.hash, b"tx") for entry in stored]


@pytest.fixture
def vault(tmp_path):
    v = Vault(tmp_path / "vault.sqlite3", KEYS, MEMBER)
    v.append(Write(entries=[_entry(n) for n in range(1, 7)]), _no_anchor)
    yield v
    v.close()


def _raw(vault):
    # Tampering goes around the vault's own connection, as an attacker with the file would.
    db = sqlite3.connect(vault.path, isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("DROP TRIGGER entries_no_delete")
    return db


def test_a_fresh_vault_verifies_and_reads_back(vault):
    report = vault.verify(IDENTITY.public_key)
    assert report["ok"], report
    assert report["entries"] == 6
    header, raw, released, salt = vault.read((3).to_bytes(16, "big"))
    assert header.position == 3 and raw["id"] == "c3" and released["id"] == "p3"
    assert commitment(salt, canonical_json(released)) == header.commitment


def test_entries_are_append_only_through_sqlite(vault):
    db = sqlite3.connect(vault.path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE entries SET raw = x'00' WHERE position = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM entries WHERE position = 1")


def test_a_flipped_byte_in_a_ciphertext_is_found(vault):
    db = _raw(vault)
    raw = bytearray(db.execute("SELECT raw FROM entries WHERE position = 4").fetchone()[0])
    raw[20] ^= 0x01
    db.execute("UPDATE entries SET raw = ? WHERE position = 4", (bytes(raw),))
    report = vault.verify(IDENTITY.public_key)
    assert not report["ok"]
    assert [p["position"] for p in report["problems"]] == [4, 4]
    assert any("raw ciphertext changed" in p["problem"] for p in report["problems"])
    with pytest.raises(IntegrityError):
        vault.read((4).to_bytes(16, "big"))


def test_a_flipped_byte_in_a_header_is_found(vault):
    db = _raw(vault)
    header = bytearray(db.execute("SELECT header FROM entries WHERE position = 2").fetchone()[0])
    header[-1] ^= 0x01  # inside the last digest
    db.execute("UPDATE entries SET header = ? WHERE position = 2", (bytes(header),))
    problems = vault.verify(IDENTITY.public_key)["problems"]
    assert {p["position"] for p in problems} == {2, 3}  # 3 no longer links to 2


def test_a_deleted_entry_is_found(vault):
    _raw(vault).execute("DELETE FROM entries WHERE position = 3")
    problems = vault.verify(IDENTITY.public_key)["problems"]
    assert problems[0]["position"] == 4
    assert "missing" in problems[0]["problem"]
    assert any("does not link" in p["problem"] for p in problems)


def test_a_swapped_pair_is_found(vault):
    db = _raw(vault)
    rows = {p: db.execute("SELECT record, header, hash, signature, raw, deid FROM entries WHERE position = ?",
                          (p,)).fetchone() for p in (2, 5)}
    db.execute("DELETE FROM entries WHERE position IN (2, 5)")
    for position, other in ((2, 5), (5, 2)):
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", (position, *rows[other]))
    problems = vault.verify(IDENTITY.public_key)["problems"]
    assert {2, 5} <= {p["position"] for p in problems}
    assert any("moved or swapped" in p["problem"] for p in problems)


def test_a_deleted_last_entry_is_found_against_the_chain(vault):
    anchored = {}
    for position in range(1, 7):
        entry = vault.entry(position.to_bytes(16, "big"))
        anchored[position] = (entry.header.record_id, entry.header.commitment, entry.hash)
    assert vault.verify(IDENTITY.public_key, anchored)["ok"]
    _raw(vault).execute("DELETE FROM entries WHERE position = 6")
    # The chain itself still links: only the anchors show the loss.
    assert vault.verify(IDENTITY.public_key)["ok"]
    problems = vault.verify(IDENTITY.public_key, anchored)["problems"]
    assert problems == [{"position": 6, "record_id": (6).to_bytes(16, "big").hex(),
                         "problem": "anchored on chain but missing from the vault"}]


def test_a_forged_signature_or_foreign_key_is_found(vault):
    other = crypto.Identity.from_seed(b"w" * 32)
    assert not vault.verify(other.public_key)["ok"]


def test_wrong_master_key_cannot_read(tmp_path, vault):
    thief = Vault(vault.path, RecordKeys.derive(bytes(32), bytes(32)), MEMBER)
    with pytest.raises(IntegrityError):
        thief.read((1).to_bytes(16, "big"))
    report = thief.verify(IDENTITY.public_key)
    assert not report["ok"] and all("does not decrypt" in p["problem"] for p in report["problems"])


def test_appends_continue_the_chain_and_patients_round_trip(vault):
    patient = PatientRow(KEYS.lookup("patient", "p1"), b"q" * 16, {"resourceType": "Patient", "id": "p1"},
                         (1950, "female", "MA"))
    vault.append(Write(entries=[_entry(7)], patients=[patient]), _no_anchor)
    assert vault.verify(IDENTITY.public_key)["ok"]
    assert vault.head()[0] == 7
    assert vault.patient(patient.lookup) == patient
    assert len(vault.outbox()) == 7


def test_a_failed_append_writes_nothing(vault):
    def failing(stored):
        if any(entry.header.position == 8 for entry in stored):
            raise StoreError("disk full")
        return _no_anchor(stored)

    with pytest.raises(StoreError):
        vault.append(Write(entries=[_entry(7), _entry(8)]), failing)
    assert vault.count() == 6
    assert vault.verify(IDENTITY.public_key)["ok"]


def test_an_outbox_from_before_batched_anchors_is_moved_in_order(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE outbox (record BLOB PRIMARY KEY, tx_id BLOB NOT NULL, tx BLOB NOT NULL)")
    rows = [(b"enrolment", b"t1", b"enrol"), (b"r2", b"t2", b"anchor 2"), (b"r1", b"t3", b"anchor 1"),
            (b"r3", b"t1", b"enrol")]  # one transaction under two keys is kept once
    db.executemany("INSERT INTO outbox VALUES (?, ?, ?)", rows)
    db.close()
    vault = Vault(path, KEYS, MEMBER)
    assert vault.outbox() == [(b"t1", b"enrol"), (b"t2", b"anchor 2"), (b"t3", b"anchor 1")]
    vault.clear_outbox([b"t2"])
    vault.close()
    vault = Vault(path, KEYS, MEMBER)  # opened again: nothing left to move
    assert vault.outbox() == [(b"t1", b"enrol"), (b"t3", b"anchor 1")]
    vault.close()


def test_missing_data_keys_are_a_problem_unless_erased(vault):
    record = (2).to_bytes(16, "big")
    sqlite3.connect(vault.path, isolation_level=None).execute("DELETE FROM data_keys WHERE record = ?", (record,))
    problems = vault.verify(IDENTITY.public_key)["problems"]
    assert [p["position"] for p in problems] == [2] and "no erasure" in problems[0]["problem"]
    report = vault.verify(IDENTITY.public_key, erased=frozenset({record}))
    assert report["ok"] and report["erased"] == 1


def test_an_entry_rewritten_and_resigned_after_anchoring_differs_from_the_chain(tmp_path, vault):
    anchored = {}
    for position in range(1, 7):
        entry = vault.entry(position.to_bytes(16, "big"))
        anchored[position] = (entry.header.record_id, entry.header.commitment, entry.hash)
    # The institution itself rebuilds its vault with other content: every link and signature is
    # fine, but the entry hashes no longer match what the chain holds.
    rebuilt = Vault(tmp_path / "rebuilt.sqlite3", KEYS, MEMBER)
    rebuilt.append(Write(entries=[_entry(n) for n in range(1, 7)]), _no_anchor)
    assert rebuilt.verify(IDENTITY.public_key)["ok"]
    problems = rebuilt.verify(IDENTITY.public_key, anchored)["problems"]
    assert {p["position"] for p in problems} == set(range(1, 7))
    assert all("rewritten after anchoring" in p["problem"] for p in problems)


def test_a_flipped_signature_or_hash_column_is_found(vault):
    db = _raw(vault)
    signature = bytearray(db.execute("SELECT signature FROM entries WHERE position = 5").fetchone()[0])
    signature[0] ^= 0x80
    db.execute("UPDATE entries SET signature = ? WHERE position = 5", (bytes(signature),))
    db.execute("UPDATE entries SET hash = ? WHERE position = 3", (bytes(32),))
    problems = vault.verify(IDENTITY.public_key)["problems"]
    assert {(p["position"], p["problem"]) for p in problems} >= {
        (5, "institution signature does not verify"), (3, "header hash does not match (header changed)")}


def test_swapped_patient_enrolments_do_not_decrypt(vault):
    rows = [PatientRow(KEYS.lookup("patient", f"p{i}"), bytes([i]) * 16, {"resourceType": "Patient", "id": f"p{i}"},
                       ()) for i in (1, 2)]
    vault.append(Write(patients=rows), _no_anchor)
    db = sqlite3.connect(vault.path, isolation_level=None)
    db.execute("UPDATE patients SET enrolment = CASE enrolment WHEN ? THEN ? ELSE ? END",
               (rows[0].enrolment, rows[1].enrolment, rows[0].enrolment))
    with pytest.raises(IntegrityError):
        vault.patient(rows[0].lookup)


def test_entries_sealed_for_a_head_that_moved_are_sealed_again(vault):
    position, prev = vault.head()
    new = [_entry(n) for n in range(20, 23)]
    sealed = []
    for entry in new:
        position += 1
        sealed.append(vault.seal(entry, position, prev))
        prev = sealed[-1].stored.hash
    vault.append(Write(entries=[_entry(30)]), _no_anchor)  # the head moves on meanwhile
    stored = vault.append(Write(entries=new, sealed=sealed), _no_anchor)
    assert [s.header.position for s in stored] == [8, 9, 10]
    assert [s.hash for s in stored] != [s.stored.hash for s in sealed]
    assert vault.verify(IDENTITY.public_key)["ok"]


def test_an_entry_encrypted_apart_is_stored_as_it_was_encrypted_and_reads_back(vault):
    """The record workers encrypt an entry before it has a position (:func:`encrypt`): the vault
    keeps those very ciphertexts, under its header's digests, signed like any other entry (also
    when the head moved and the entry is sealed again for the next position)."""
    plain = _entry(50)
    encrypted = encrypt(plain.record_id, plain.raw, plain.release)
    entries = [replace(plain, encrypted=encrypted), replace(_entry(51), encrypted=None)]
    position, prev = vault.head()
    sealed = vault.seal(entries[0], position + 1, prev)
    assert sealed.row[5:] == (encrypted.raw, encrypted.deid)
    header = sealed.stored.header
    assert (header.raw_digest, header.deid_digest) == (crypto.sha256(encrypted.raw), crypto.sha256(encrypted.deid))
    assert sealed.row[2] == codec.encode(header.to_wire())
    assert sealed.stored.hash == crypto.sha256(header.signed_bytes)
    assert crypto.verify(IDENTITY.public_key, header.signed_bytes, sealed.row[4])
    vault.append(Write(entries=[_entry(52)]), _no_anchor)  # the head moves on meanwhile
    stored = vault.append(Write(entries=entries, sealed=[sealed]), _no_anchor)
    assert [s.header.position for s in stored] == [8, 9]
    assert vault.verify(IDENTITY.public_key)["ok"]
    row = sqlite3.connect(vault.path).execute("SELECT raw, deid FROM entries WHERE position = 8").fetchone()
    assert row == (encrypted.raw, encrypted.deid)
    header, raw, released, salt = vault.read(plain.record_id)
    assert raw["id"] == "c50" and released["id"] == "p50"
    assert commitment(salt, canonical_json(released)) == header.commitment == plain.commitment


def test_what_was_encrypted_apart_is_checked_before_it_is_signed(vault):
    """A worker's mistake is refused, not written for good: ciphertexts made for another record
    (their AAD names it: they could never be opened), or a record id or commitment of the wrong
    size (the header could not be read back)."""
    position, prev = vault.head()
    entry = _entry(60)
    other = encrypt((61).to_bytes(16, "big"), entry.raw, entry.release)
    for bad in (replace(entry, encrypted=other), replace(entry, record_id=bytes(15)),
                replace(entry, commitment=bytes(31))):
        with pytest.raises(IntegrityError):
            vault.seal(bad, position + 1, prev)
    assert vault.head() == (position, prev)


def test_sealed_entries_for_other_entries_are_not_used(vault):
    position, prev = vault.head()
    sealed = [vault.seal(_entry(40), position + 1, prev)]
    stored = vault.append(Write(entries=[_entry(41)], sealed=sealed), _no_anchor)
    assert stored[0].header.record_id == (41).to_bytes(16, "big")
    assert vault.verify(IDENTITY.public_key)["ok"]


def test_a_large_write_leaves_its_log_for_the_checkpoint_not_its_commit(tmp_path):
    """An ingest's commit does not wait for the write-ahead log to be copied into the database
    file (thousands of pages, past SQLite's default of 1000); :meth:`Vault.checkpoint` copies it
    afterwards, once, and the vault reads back the same from either."""
    path = tmp_path / "vault.sqlite3"
    v = Vault(path, KEYS, MEMBER)
    try:
        before = path.stat().st_size
        big = [replace(_entry(n), raw=canonical_json({"resourceType": "Condition", "id": f"c{n}",
                                                     "note": [{"text": "x" * 6000}]})) for n in range(1, 801)]
        v.append(Write(entries=big), _no_anchor)
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size > 1000 * 4096  # more pages than a commit would have copied by default
        assert path.stat().st_size == before  # none copied at commit
        v.checkpoint()
        copied = path.stat().st_size
        assert copied > before + 800 * 6000
        v.checkpoint()  # nothing left to copy
        assert path.stat().st_size == copied
        assert v.verify(IDENTITY.public_key)["ok"]
    finally:
        v.close()
    reopened = Vault(path, KEYS, MEMBER)
    try:
        assert reopened.head()[0] == 800
        assert reopened.read((800).to_bytes(16, "big"))[1]["note"][0]["text"] == "x" * 6000
    finally:
        reopened.close()
