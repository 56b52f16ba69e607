"""The vault: the institution's private chain of records.

Theory of operation
-------------------
Every record this institution writes is one *entry*, appended at the next
position (1, 2, 3, ...) of an SQLite table that refuses UPDATE and DELETE.
An entry holds two ciphertexts, the raw FHIR resource and its de-identified
release (with the salt of its commitment), each under its own AES-256-GCM
data key. The data keys live in a separate table, wrapped by the node's
``wrap`` key: destroying a record's key row (erasure) makes its data
unreadable while the entry, and so the chain, stays intact.

An entry's *header* is canonical CBOR of its position, the previous entry's
hash, the record id, type, the patient's enrolment id, setting, recording time, the commitment that
goes on chain, and the SHA-256 of both ciphertexts. Its hash is the SHA-256
of the domain-tagged header, and the institution signs that same tagged
header with its member key. So:

- a changed byte in a ciphertext no longer matches the header's digest;
- a changed header no longer matches its hash, its signature or the next
  entry's ``prev``;
- a removed entry leaves a gap in positions and a broken ``prev`` link;
- two swapped entries each sit at a position their header does not name;
- a removed *last* entry leaves no gap, which is why :meth:`Vault.verify`
  also takes the positions and commitments anchored on the consortium chain.

Besides the entries, the vault file holds the node's *patient table* (each
patient's raw Patient resource and released quasi-identifiers, sealed under
the ``patients`` key, found by a keyed lookup value rather than by local id),
the setting of each encounter recorded, which resource versions are already
recorded (so re-running an ingest is harmless), and the *outbox*: the
transactions this node wrote with its records (enrolments, anchors, erasures) not
yet seen committed.

The vault is written with ``synchronous=FULL``: unlike blocks, which peers can
send again, a record exists nowhere else. A commit leaves its write-ahead log
for :meth:`Vault.checkpoint` to copy into the file (the records upkeep calls it
every few seconds) rather than copying it itself, unless the log grows past
``WAL_AUTOCHECKPOINT`` pages.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .. import codec, crypto
from ..codec import as_bytes, as_map, as_str, as_uint
from ..errors import CodecError, CryptoError, IntegrityError, StoreError
from ..storage import open_db, transaction
from .canonical import canonical_json, commitment
from .keys import RecordKeys, new_data_key, open_sealed, seal

ENTRY_DOMAIN = "ehrnode/vault-entry/v1"
#: What :func:`crypto.signing_bytes` puts before a header's CBOR under ``ENTRY_DOMAIN`` (the
#: array of two and the domain): a header encoded once gives both its stored and signed bytes.
_SIGNED_PREFIX = crypto.signing_bytes(ENTRY_DOMAIN, None)[:-1]
GENESIS_PREV = bytes(32)
RECORD_ID_SIZE = 16
#: The vault's own ciphertexts are authenticated: they decode up to the largest input intake takes.
MAX_STORED = 64 * 1024 * 1024
ENROLMENT_SIZE = 16
#: Write-ahead-log pages past which a commit also copies the log into the database file. A large
#: ingest writes thousands of pages; the node copies them once the ingest is done
#: (:meth:`Vault.checkpoint`, from the records service's upkeep) rather than within its commit,
#: where the ingest would wait for it. This bound (64 MiB of 4 KiB pages) only keeps the log from
#: growing without end should that upkeep not run.
WAL_AUTOCHECKPOINT = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    position INTEGER PRIMARY KEY, record BLOB NOT NULL UNIQUE, header BLOB NOT NULL,
    hash BLOB NOT NULL, signature BLOB NOT NULL, raw BLOB NOT NULL, deid BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'vault entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'vault entries are append-only'); END;
CREATE TABLE IF NOT EXISTS data_keys (record BLOB PRIMARY KEY, raw BLOB NOT NULL, deid BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patients (lookup BLOB PRIMARY KEY, enrolment BLOB NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS encounters (lookup BLOB PRIMARY KEY, setting TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (lookup BLOB PRIMARY KEY, digest BLOB NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox_txs (tx_id BLOB PRIMARY KEY, tx BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS erasures (record BLOB PRIMARY KEY, reason TEXT NOT NULL, erased_at INTEGER NOT NULL,
    tx_id BLOB NOT NULL);
"""


@dataclass(frozen=True)
class EntryHeader:
    position: int
    prev: bytes
    record_id: bytes
    resource_type: str
    patient: bytes  # the patient's enrolment id
    setting: str
    recorded_at: int
    commitment: bytes
    raw_digest: bytes
    deid_digest: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": 1, "position": self.position, "prev": self.prev, "record": self.record_id,
            "type": self.resource_type, "patient": self.patient, "setting": self.setting,
            "recorded_at": self.recorded_at,
            "commitment": self.commitment, "raw": self.raw_digest, "deid": self.deid_digest,
        }

    @classmethod
    def from_wire(cls, data: bytes) -> EntryHeader:
        m = as_map(codec.decode(data), "vault entry", ("v", "position", "prev", "record", "type", "patient", "setting",
                                                       "recorded_at", "commitment", "raw", "deid"))
        if m["v"] != 1:
            raise CodecError(f"vault entry version {m['v']!r} is not supported", reason="version")
        return cls(
            as_uint(m["position"], "entry.position"), as_bytes(m["prev"], "entry.prev", size=32),
            as_bytes(m["record"], "entry.record", size=RECORD_ID_SIZE), as_str(m["type"], "entry.type", max_len=64),
            as_bytes(m["patient"], "entry.patient", size=ENROLMENT_SIZE),
            as_str(m["setting"], "entry.setting", max_len=64),
            as_uint(m["recorded_at"], "entry.recorded_at"), as_bytes(m["commitment"], "entry.commitment", size=32),
            as_bytes(m["raw"], "entry.raw", size=32), as_bytes(m["deid"], "entry.deid", size=32),
        )

    @property
    def signed_bytes(self) -> bytes:
        return crypto.signing_bytes(ENTRY_DOMAIN, self.to_wire())

    @property
    def hash(self) -> bytes:
        return crypto.sha256(self.signed_bytes)


class Encrypted(NamedTuple):
    """A new entry's two ciphertexts for record ``record_id``, each under a fresh data key not yet
    wrapped: the part of sealing an entry that does not depend on its position, so it can be made
    apart from the vault (the record workers make it beside the release)."""

    record_id: bytes
    raw: bytes
    deid: bytes
    raw_key: bytes
    deid_key: bytes

    def __repr__(self) -> str:
        return f"Encrypted(record_id={self.record_id.hex()}, raw={len(self.raw)} bytes, deid={len(self.deid)} bytes)"


def encrypt(record_id: bytes, raw: bytes, release: bytes) -> Encrypted:
    """The ciphertexts of a new entry's ``raw`` resource and ``release``, bound to its record id."""
    raw_key, deid_key = new_data_key(), new_data_key()
    return Encrypted(record_id, seal(raw_key, raw, record_id + b"raw"), seal(deid_key, release, record_id + b"deid"),
                     raw_key, deid_key)


@dataclass(frozen=True)
class NewEntry:
    """A record ready to append: everything but its position and chain link."""

    record_id: bytes
    resource_type: str
    patient: bytes
    setting: str
    recorded_at: int
    commitment: bytes
    raw: bytes  # canonical JSON of the resource as received
    release: bytes  # canonical CBOR {"salt", "resource"}: the de-identified release
    #: ``raw`` and ``release`` encrypted already (:func:`encrypt`), or None: sealing does it.
    encrypted: Encrypted | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PatientRow:
    lookup: bytes
    enrolment: bytes
    resource: dict[str, Any]
    released: tuple[Any, ...]


@dataclass
class Write:
    """Everything one ingest changes, applied in one transaction."""

    entries: list[NewEntry] = field(default_factory=list)
    patients: list[PatientRow] = field(default_factory=list)
    encounters: dict[bytes, str] = field(default_factory=dict)
    versions: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)  # lookup -> (digest, record)
    #: Transactions that must reach the chain before the anchors (EMPI enrolments): (tx_id, tx).
    before: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: ``entries`` already sealed (:meth:`Vault.seal`) for the positions after the vault's head,
    #: while the input was still being de-identified; sealed again if the head is not that one.
    sealed: list[SealedEntry] = field(default_factory=list)


@dataclass(frozen=True)
class StoredEntry:
    header: EntryHeader
    hash: bytes


@dataclass(frozen=True)
class SealedEntry:
    """A new entry made ready for its position (:meth:`Vault.seal`): encrypted, linked, signed."""

    entry: NewEntry
    stored: StoredEntry
    row: tuple[Any, ...]  # of the entries table
    keys: tuple[bytes, bytes, bytes]  # of the data_keys table


class Vault:
    """Blocking; one caller at a time (the node runs it in a worker thread under a lock)."""

    def __init__(self, path: Path, keys: RecordKeys, member: crypto.MemberKeys) -> None:
        self.path = Path(path)
        self._keys = keys
        self._member = member  # signs each entry with the member's current key
        self._db = open_db(self.path, _SCHEMA, "vault", durable=True, any_thread=True)
        # Erasure deletes data keys: overwrite their bytes rather than leave them in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        self._migrate_outbox()
        #: Each recorded Patient's released quasi-identifiers by resource id: opened from the
        #: patient table the first time they are needed, then kept as patients are written (their
        #: text shared: many patients release the same birth period, gender and region).
        self._released: dict[str, tuple[Any, ...]] | None = None

    def close(self) -> None:
        self._db.close()

    # --- writing -----------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        row = self._db.execute("SELECT position, hash FROM entries ORDER BY position DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS_PREV)

    def _migrate_outbox(self) -> None:
        """A vault written before anchors were batched kept its outbox one row per record (or
        enrolment), each with its transaction: move the transactions, in order, to ``outbox_txs``."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone():
            return
        with transaction(self._db, "move the vault's outbox") as db:
            db.execute("INSERT OR IGNORE INTO outbox_txs SELECT tx_id, tx FROM outbox ORDER BY rowid")
            db.execute("DROP TABLE outbox")

    def append(self, write: Write, make_anchors: Callable[[list[StoredEntry]], list[tuple[bytes, bytes]]],
               ) -> list[StoredEntry]:
        """Append ``write.entries`` in order and store the rest of ``write``, atomically.

        ``make_anchors(stored) -> [(tx_id, tx_bytes), ...]`` builds the anchor transactions of
        the entries once their positions are known; they go to the outbox in the same
        transaction, so a record is never written without the anchor that announces it.
        """
        with transaction(self._db, "append to the vault") as db:
            db.executemany("INSERT OR IGNORE INTO outbox_txs VALUES (?, ?)", write.before)
            sealed = write.sealed
            if not self._follows_head(sealed, write.entries):
                sealed = []
                position, prev = self.head()
                for entry in write.entries:
                    sealed.append(self.seal(entry, position + 1, prev))
                    position, prev = position + 1, sealed[-1].stored.hash
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", [s.row for s in sealed])
            db.executemany("INSERT INTO data_keys VALUES (?, ?, ?)", [s.keys for s in sealed])
            stored = [s.stored for s in sealed]
            db.executemany("INSERT INTO outbox_txs VALUES (?, ?)", make_anchors(stored))
            for patient in write.patients:
                db.execute("INSERT OR REPLACE INTO patients VALUES (?, ?, ?)",
                           (patient.lookup, patient.enrolment, self._seal_patient(patient)))
            db.executemany("INSERT OR REPLACE INTO encounters VALUES (?, ?)", write.encounters.items())
            db.executemany("INSERT OR REPLACE INTO versions VALUES (?, ?, ?)",
                           [(k, d, r) for k, (d, r) in write.versions.items()])
        if self._released is not None:
            self._released.update((p.resource["id"], self._value(p.released)) for p in write.patients)
        return stored

    def seal(self, entry: NewEntry, position: int, prev: bytes) -> SealedEntry:
        """``entry`` encrypted under fresh data keys (wrapped), or as it was encrypted already
        (``entry.encrypted``), with its header at ``position`` after the entry hashed ``prev``,
        signed. Touches no table: any thread may call it.

        What was encrypted elsewhere (in a record worker) is checked for what the entry's header
        and rows need before it is signed, and the ciphertexts' digests are taken here: nothing
        a worker made is written unless it fits the entry."""
        if len(entry.record_id) != RECORD_ID_SIZE or len(entry.commitment) != 32:
            raise IntegrityError("a new entry needs a 16-byte record id and a 32-byte commitment", reason="malformed")
        encrypted = entry.encrypted or encrypt(entry.record_id, entry.raw, entry.release)
        if encrypted.record_id != entry.record_id:
            raise IntegrityError("an entry's ciphertexts were made for another record", reason="malformed")
        header = EntryHeader(
            position, prev, entry.record_id, entry.resource_type, entry.patient, entry.setting,
            entry.recorded_at, entry.commitment, crypto.sha256(encrypted.raw), crypto.sha256(encrypted.deid),
        )
        encoded = codec.encode(header.to_wire())
        signed = _SIGNED_PREFIX + encoded  # header.signed_bytes, without encoding the header again
        entry_hash = crypto.sha256(signed)
        row = (position, entry.record_id, encoded, entry_hash, self._member.identity.sign(signed, remember=False),
               encrypted.raw, encrypted.deid)
        keys = (entry.record_id, seal(self._keys.wrap, encrypted.raw_key, entry.record_id + b"raw-key"),
                seal(self._keys.wrap, encrypted.deid_key, entry.record_id + b"deid-key"))
        return SealedEntry(entry, StoredEntry(header, entry_hash), row, keys)

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database file, as a commit past
        ``WAL_AUTOCHECKPOINT`` pages would (nothing to do if it was copied already)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot checkpoint the vault: {exc}") from exc

    def _follows_head(self, sealed: list[SealedEntry], entries: list[NewEntry]) -> bool:
        """Whether ``sealed`` are ``entries``, sealed in order for the positions after the head."""
        if len(sealed) != len(entries) or any(s.entry is not e for s, e in zip(sealed, entries, strict=True)):
            return False
        position, prev = self.head()
        for s in sealed:
            if (s.stored.header.position, s.stored.header.prev) != (position + 1, prev):
                return False
            position, prev = position + 1, s.stored.hash
        return True

    def _seal_patient(self, patient: PatientRow) -> bytes:
        body = codec.encode({"resource": canonical_json(patient.resource), "released": list(patient.released)})
        # The enrolment column is bound in: rows cannot swap patients unnoticed.
        return seal(self._keys.patients, body, patient.lookup + patient.enrolment)

    # --- reading -----------------------------------------------------------------------

    def patient(self, lookup: bytes) -> PatientRow | None:
        row = self._db.execute("SELECT lookup, enrolment, sealed FROM patients WHERE lookup = ?", (lookup,)).fetchone()
        return self._open_patient(row) if row else None

    def released(self) -> Mapping[str, tuple[Any, ...]]:
        """What each recorded Patient released of its quasi-identifiers, by resource id. The
        patient table is opened once (every row decrypted) and the answer kept up to date by
        :meth:`append`, so k-anonymity does not decrypt every patient at each ingest."""
        if self._released is None:
            self._released = {row.resource["id"]: self._value(row.released) for row in self.patients()}
        return self._released

    @staticmethod
    def _value(released: Iterable[Any]) -> tuple[Any, ...]:
        return tuple(sys.intern(v) if isinstance(v, str) else v for v in released)

    def patients(self) -> Iterator[PatientRow]:
        for row in self._db.execute("SELECT lookup, enrolment, sealed FROM patients").fetchall():
            yield self._open_patient(row)

    def _open_patient(self, row: tuple[bytes, bytes, bytes]) -> PatientRow:
        lookup, enrolment, sealed = row
        body = codec.decode(open_sealed(self._keys.patients, sealed, lookup + enrolment, "patient table row"),
                            max_size=MAX_STORED)
        return PatientRow(lookup, enrolment, json.loads(body["resource"]), tuple(body["released"]))

    def setting(self, lookup: bytes) -> str | None:
        row = self._db.execute("SELECT setting FROM encounters WHERE lookup = ?", (lookup,)).fetchone()
        return row[0] if row else None

    def version(self, lookup: bytes) -> tuple[bytes, bytes] | None:
        """(content digest, record id) of the version of a resource recorded last."""
        row = self._db.execute("SELECT digest, record FROM versions WHERE lookup = ?", (lookup,)).fetchone()
        return (row[0], row[1]) if row else None

    def entry(self, record_id: bytes) -> StoredEntry | None:
        row = self._db.execute("SELECT header, hash FROM entries WHERE record = ?", (record_id,)).fetchone()
        return StoredEntry(EntryHeader.from_wire(row[0]), row[1]) if row else None

    def read(self, record_id: bytes) -> tuple[EntryHeader, dict[str, Any], dict[str, Any], bytes]:
        """(header, raw resource, de-identified resource, salt); raises KeyError or IntegrityError."""
        row = self._db.execute(
            "SELECT e.header, e.raw, e.deid, k.raw, k.deid FROM entries e LEFT JOIN data_keys k USING (record) "
            "WHERE e.record = ?", (record_id,),
        ).fetchone()
        if row is None:
            raise KeyError(record_id.hex())
        header = EntryHeader.from_wire(row[0])
        if row[3] is None:
            raise IntegrityError(f"record {record_id.hex()}: its data keys are gone", reason="erased")
        raw, release = self._decrypt(record_id, row[1], row[2], row[3], row[4])
        return header, json.loads(raw), json.loads(release["resource"]), release["salt"]

    def release(self, record_id: bytes) -> tuple[EntryHeader, bytes, bytes]:
        """(header, canonical JSON of the release, salt), decrypting only the release.

        Raises KeyError (no such record) or IntegrityError (erased, or does not decrypt).
        """
        row = self._db.execute(
            "SELECT e.header, e.deid, k.deid FROM entries e LEFT JOIN data_keys k USING (record) "
            "WHERE e.record = ?", (record_id,),
        ).fetchone()
        if row is None:
            raise KeyError(record_id.hex())
        if row[2] is None:
            raise IntegrityError(f"record {record_id.hex()} is erased", reason="erased")
        what = f"record {record_id.hex()}"
        key = open_sealed(self._keys.wrap, row[2], record_id + b"deid-key", f"{what} release data key")
        release = codec.decode(open_sealed(key, row[1], record_id + b"deid", f"{what} release"), max_size=MAX_STORED)
        return EntryHeader.from_wire(row[0]), release["resource"], release["salt"]

    def state_of(self, record_id: bytes) -> str | None:
        """``present``, ``erased`` or None (no such record in this vault)."""
        row = self._db.execute("SELECT k.record FROM entries e LEFT JOIN data_keys k USING (record) "
                               "WHERE e.record = ?", (record_id,)).fetchone()
        if row is None:
            return None
        return "present" if row[0] is not None else "erased"

    def erase(self, record_id: bytes, reason: str, erased_at: int, tx_id: bytes, tx: bytes) -> None:
        """Destroy a record's data keys (its entry, and so the hash chain, stay), keep why, and queue
        the ``record.erase`` transaction in the outbox, all at once. Raises KeyError or IntegrityError."""
        state = self.state_of(record_id)
        if state is None:
            raise KeyError(record_id.hex())
        if state == "erased":
            raise IntegrityError(f"record {record_id.hex()} is already erased", reason="already_erased")
        with transaction(self._db, "erase a record") as db:
            db.execute("DELETE FROM data_keys WHERE record = ?", (record_id,))
            db.execute("INSERT INTO erasures VALUES (?, ?, ?, ?)", (record_id, reason, erased_at, tx_id))
            db.execute("INSERT OR IGNORE INTO outbox_txs VALUES (?, ?)", (tx_id, tx))
        try:
            # Old pages of the key row may linger in the write-ahead log until a checkpoint.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # busy: the next checkpoint overwrites them

    def _decrypt(self, record_id: bytes, raw_ct: bytes, deid_ct: bytes, raw_w: bytes,
                 deid_w: bytes) -> tuple[bytes, dict[str, Any]]:
        what = f"record {record_id.hex()}"
        raw_key = open_sealed(self._keys.wrap, raw_w, record_id + b"raw-key", f"{what} raw data key")
        deid_key = open_sealed(self._keys.wrap, deid_w, record_id + b"deid-key", f"{what} release data key")
        raw = open_sealed(raw_key, raw_ct, record_id + b"raw", f"{what} raw resource")
        release = codec.decode(open_sealed(deid_key, deid_ct, record_id + b"deid", f"{what} release"),
                               max_size=MAX_STORED)
        return raw, release

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def outbox(self) -> list[tuple[bytes, bytes]]:
        """(tx_id, tx) of every transaction written here and not yet seen committed, oldest first."""
        return self._db.execute("SELECT tx_id, tx FROM outbox_txs ORDER BY rowid").fetchall()

    def clear_outbox(self, tx_ids: Iterable[bytes]) -> None:
        with transaction(self._db, "clear the outbox") as db:
            db.executemany("DELETE FROM outbox_txs WHERE tx_id = ?", [(t,) for t in tx_ids])

    # --- verifying ---------------------------------------------------------------------

    def verify(self, public_key: bytes | Collection[bytes],
               anchored: Mapping[int, tuple[bytes, bytes, bytes]] | None = None,
               *, decrypt: bool = True, erased: frozenset[bytes] = frozenset()) -> dict[str, Any]:
        """Walk the whole chain and report every problem found (never raises on bad data).

        ``public_key``: the institution's signing key, or every key it has held (its keys can be
        replaced by a rotate-key; entries keep the signature of the key current when written).

        ``anchored`` maps vault positions to the (record id, commitment, entry hash) the
        consortium chain holds for them; every one must be present and equal, so an entry
        rewritten and re-signed after it was anchored is found too. ``decrypt`` also unwraps
        each entry's keys and authenticates both ciphertexts. A record without data keys is
        a problem unless it is in ``erased`` (erased on chain) or this vault's own erasures.
        """
        problems: list[dict[str, Any]] = []
        keys = (public_key,) if isinstance(public_key, bytes) else tuple(public_key)
        # Erased here and not yet committed on chain: recorded in this vault in the same transaction.
        erased = erased | {r[0] for r in self._db.execute("SELECT record FROM erasures")}
        prev, expected = GENESIS_PREV, 1
        seen: dict[int, tuple[bytes, bytes, bytes]] = {}
        erased_count = 0
        try:
            rows = self._db.execute(
                "SELECT e.position, e.record, e.header, e.hash, e.signature, e.raw, e.deid, k.raw, k.deid "
                "FROM entries e LEFT JOIN data_keys k USING (record) ORDER BY e.position"
            )
            for position, record, header_bytes, stored_hash, signature, raw_ct, deid_ct, raw_w, deid_w in rows:
                def problem(text: str, position: int = position, record: bytes = record) -> None:
                    problems.append({"position": position, "record_id": record.hex(), "problem": text})

                if position != expected:
                    problem(f"entries {expected}..{position - 1} are missing")
                expected = position + 1
                try:
                    header = EntryHeader.from_wire(header_bytes)
                except CodecError as exc:
                    problem(f"header does not decode: {exc}")
                    prev = stored_hash
                    continue
                signed = header.signed_bytes
                computed = crypto.sha256(signed)
                if header.position != position:
                    problem(f"entry names position {header.position}: entries were moved or swapped")
                if header.record_id != record:
                    problem("header names another record id")
                if header.prev != prev:
                    problem("does not link to the entry before it (changed, removed or reordered)")
                if computed != stored_hash:
                    problem("header hash does not match (header changed)")
                try:
                    if not any(crypto.verify(key, signed, signature) for key in keys):
                        problem("institution signature does not verify")
                except CryptoError:
                    problem("institution signature is malformed")
                if crypto.sha256(raw_ct) != header.raw_digest:
                    problem("raw ciphertext changed")
                if crypto.sha256(deid_ct) != header.deid_digest:
                    problem("release ciphertext changed")
                if raw_w is None:
                    if record in erased:
                        erased_count += 1
                    else:
                        problem("data keys are missing, and no erasure is recorded")
                elif decrypt:
                    try:
                        _, release = self._decrypt(record, raw_ct, deid_ct, raw_w, deid_w)
                        if commitment(release["salt"], release["resource"]) != header.commitment:
                            problem("release does not match its commitment")
                    except (IntegrityError, CodecError, KeyError, TypeError) as exc:
                        problem(f"does not decrypt: {exc}")
                seen[position] = (record, header.commitment, stored_hash)
                prev = computed
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the vault {self.path}: {exc}") from exc
        for position, (record, anchored_commitment, entry_hash) in sorted((anchored or {}).items()):
            mine = seen.get(position)
            if mine is None:
                problems.append({"position": position, "record_id": record.hex(),
                                 "problem": "anchored on chain but missing from the vault"})
            elif mine != (record, anchored_commitment, entry_hash):
                problems.append({"position": position, "record_id": record.hex(),
                                 "problem": "differs from its anchor on chain (rewritten after anchoring)"})
        return {"ok": not problems, "entries": len(seen), "erased": erased_count, "head": prev.hex(),
                "anchored": len(anchored or {}), "problems": problems}
