"""The EMPI registry: which enrolments are one patient, decided the same way on every node.

Theory of operation
-------------------
An institution *enrols* each of its patients once (``empi.enrol``): a 16-byte
enrolment id (its own pseudonym for the patient) and the patient's keyed
encodings (``ehrnode.empi.encoding``): no name, date or number in clear. When
the enrolment is committed, every node assigns it an EMPI by the same rules
over the same committed data:

1. an enrolment whose national-id pseudonym equals an earlier one's joins that
   enrolment's EMPI (certain);
2. otherwise the earlier enrolments sharing a blocking key are scored
   (``ehrnode.empi.matching``); the best one (one that links before one that
   does not, such as a possible housemate; then highest score, then lowest
   enrolment id) decides: if it links, the enrolment joins its EMPI; otherwise it
   gets a new EMPI, and every candidate between the thresholds goes to the review
   queue as a potential duplicate.

A new EMPI is derived from the enrolment transaction's id, so it is the same on
every node. Records never carry an EMPI, only their enrolment: a merge or
unmerge moves enrolments between EMPIs and every record follows.

Curators act with signed transactions: ``empi.link`` (an enrolment joins an
EMPI), ``empi.split`` (an enrolment leaves its EMPI for a new one),
``empi.not_duplicate`` (closes a review item), ``empi.merge`` (every enrolment
of one EMPI moves into another, which the old EMPI then resolves to) and
``empi.unmerge`` (undoes one merge: the enrolments it moved go back). Every
change is kept in the history.

Authority. An institution speaks only for its own enrolments. A change that
puts patients of other institutions together needs their agreement, because
an EMPI decides whose consent and whose records count for whom:

- ``empi.link`` of the submitter's enrolment into EMPI T takes effect at once
  when no other institution holds an enrolment under T, or when the registry's
  own evidence makes the enrolment a *certain* match of one under T (equal
  national-id pseudonyms, or a score above ``matching.CERTAIN``); otherwise it
  is held as a request;
- ``empi.merge`` of S into T needs the submitter to hold an enrolment under S
  or T, and takes effect at once only when no other institution holds one
  under either; otherwise it is held as a request;
- a request takes effect when every other institution holding enrolments under
  the EMPIs it joins (as they stand then) has sent ``empi.accept`` for it; the
  requester cannot accept its own. Moving one's own enrolment out of an EMPI
  (``empi.split``) or undoing a merge one took part in needs nobody's agreement:
  those only separate.

Scores are integers (fixed point), candidates are read in a fixed order and
nothing depends on wall time, so the registry is identical on every node.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .. import codec, crypto
from ..empi import matching
from ..empi.encoding import Encodings
from ..errors import CodecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolments (
    id BLOB PRIMARY KEY, institution TEXT NOT NULL, encodings BLOB NOT NULL, national BLOB,
    empi TEXT NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS enrolments_empi ON enrolments(empi);
CREATE INDEX IF NOT EXISTS enrolments_national ON enrolments(national);
CREATE TABLE IF NOT EXISTS blocking (key BLOB NOT NULL, enrolment BLOB NOT NULL, PRIMARY KEY (key, enrolment));
CREATE TABLE IF NOT EXISTS empis (empi TEXT PRIMARY KEY, height INTEGER NOT NULL, merged_into TEXT);
CREATE INDEX IF NOT EXISTS empis_merged ON empis(merged_into) WHERE merged_into IS NOT NULL;
CREATE TABLE IF NOT EXISTS review (
    a BLOB NOT NULL, b BLOB NOT NULL, score INTEGER NOT NULL, status TEXT NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS merges (
    tx_id BLOB PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL, moved BLOB NOT NULL,
    height INTEGER NOT NULL, undone INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS empi_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, empi TEXT NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL,
    event TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS empi_history_empi ON empi_history(empi);
CREATE TABLE IF NOT EXISTS empi_requests (
    tx_id BLOB PRIMARY KEY, kind TEXT NOT NULL, submitter TEXT NOT NULL, body BLOB NOT NULL,
    accepted TEXT NOT NULL, status TEXT NOT NULL, height INTEGER NOT NULL);
"""

DECODED_CACHE = 100_000
#: Enrolments of an EMPI a link's evidence is scored against (an EMPI is one person: a few).
MAX_EVIDENCE = 64
EMPI_PREFIX = "E"


def scoped_enrolment(institution: str, enrolment: bytes) -> bytes:
    """The registry's id for ``institution``'s enrolment: an institution can only ever name its own.

    Enrolment ids are each institution's pseudonyms and could be copied by another member
    from gossip; scoping them by the submitter makes a copied id a different enrolment.
    """
    return crypto.sha256(b"ehrnode/enrolment\x1f" + institution.encode() + b"\x1f" + enrolment)[:16]


def new_empi(tx_id: bytes) -> str:
    digest = crypto.sha256(b"ehrnode/empi/v1" + tx_id)[:15]
    return EMPI_PREFIX + base64.b32encode(digest).decode("ascii")


class EmpiRegistry:
    """Applies EMPI transactions inside the ledger state's block transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        # Decoded encodings by enrolment id. Candidates are always chosen from the tables, so
        # the cache only saves decoding. A block whose application fails stops the node (a
        # StoreError), and the cache goes with it, so it never outlives a rolled-back write.
        self._decoded: OrderedDict[bytes, Encodings] = OrderedDict()

    def _encodings(self, enrolment: bytes, blob: bytes | None = None) -> Encodings:
        cached = self._decoded.get(enrolment)
        if cached is not None:
            self._decoded.move_to_end(enrolment)
            return cached
        if blob is None:
            blob = self._db.execute("SELECT encodings FROM enrolments WHERE id = ?", (enrolment,)).fetchone()[0]
        return self._remember(enrolment, Encodings.from_wire(codec.decode(blob)))

    def _remember(self, enrolment: bytes, encodings: Encodings) -> Encodings:
        self._decoded[enrolment] = encodings
        self._decoded.move_to_end(enrolment)
        if len(self._decoded) > DECODED_CACHE:
            self._decoded.popitem(last=False)
        return encodings

    # --- applying (inside the block's SQLite transaction) --------------------------------

    def enrol(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
              tx_id: bytes) -> str:
        """Apply ``empi.enrol``; returns the transaction status."""
        if body["institution"] != submitter:
            return "invalid:not_owner"
        try:
            encodings = Encodings.from_wire(body["encodings"])
        except CodecError:
            return "invalid:encodings"
        enrolment = scoped_enrolment(submitter, body["enrolment"])
        known = db.execute("SELECT institution, empi FROM enrolments WHERE id = ?", (enrolment,)).fetchone()
        if known is not None:
            # New demographics for a known patient: encodings and blocking keys follow; the EMPI
            # stays (a curator decides moves), but new likely matches go to review.
            db.execute("UPDATE enrolments SET encodings = ?, national = ? WHERE id = ?",
                       (codec.encode(body["encodings"]), encodings.national_id, enrolment))
            self._remember(enrolment, encodings)
            db.execute("DELETE FROM blocking WHERE enrolment = ?", (enrolment,))
            for other in self.candidates(db, encodings):
                if other == enrolment:
                    continue
                score = matching.score(encodings, self._encodings(other))
                theirs = db.execute("SELECT empi FROM enrolments WHERE id = ?", (other,)).fetchone()[0]
                if matching.classify(score) != "new" and theirs != known[1]:
                    a, b = sorted((enrolment, other))
                    db.execute("INSERT OR IGNORE INTO review VALUES (?, ?, ?, 'open', ?)", (a, b, score.total, height))
            self._block(db, enrolment, matching.blocking_keys(encodings))
            self._history(db, known[1], height, tx_id, "re-enrolled", f"{submitter} {enrolment.hex()}")
            return "ok"
        empi, grade, reviews = self._assign(db, encodings, tx_id)
        if empi is None:
            empi = new_empi(tx_id)
            db.execute("INSERT INTO empis VALUES (?, ?, NULL)", (empi, height))
            self._history(db, empi, height, tx_id, "created", f"{submitter} {enrolment.hex()}")
        else:
            self._history(db, empi, height, tx_id, "enrolled", f"{submitter} {enrolment.hex()} {grade}")
        db.execute("INSERT INTO enrolments VALUES (?, ?, ?, ?, ?, ?, ?)", (
            enrolment, submitter, codec.encode(body["encodings"]), encodings.national_id, empi, height, tx_id))
        self._remember(enrolment, encodings)
        self._block(db, enrolment, matching.blocking_keys(encodings))
        for other, total in reviews:
            a, b = sorted((enrolment, other))
            db.execute("INSERT OR IGNORE INTO review VALUES (?, ?, ?, 'open', ?)", (a, b, total, height))
        return "ok"

    def _block(self, db: sqlite3.Connection, enrolment: bytes, keys: Iterable[bytes]) -> None:
        db.executemany("INSERT OR IGNORE INTO blocking VALUES (?, ?)", [(k, enrolment) for k in keys])

    def _assign(self, db: sqlite3.Connection, encodings: Encodings,
                tx_id: bytes) -> tuple[str | None, str, list[tuple[bytes, int]]]:
        """(EMPI to join or None, match grade, candidates for review)."""
        if encodings.national_id is not None:
            row = db.execute("SELECT empi FROM enrolments WHERE national = ? ORDER BY height, id LIMIT 1",
                             (encodings.national_id,)).fetchone()
            if row is not None:
                return row[0], "certain", []
        scored = [(matching.score(encodings, self._encodings(other)), other)
                  for other in self.candidates(db, encodings)]
        if not scored:
            return None, "new", []
        scored.sort(key=lambda item: matching.best_first(*item))
        best, best_id = scored[0]
        if matching.classify(best) == "link":
            empi = db.execute("SELECT empi FROM enrolments WHERE id = ?", (best_id,)).fetchone()[0]
            return empi, matching.match_grade(best) or "probable", []
        reviews = [(other, s.total) for s, other in scored if matching.classify(s) == "review"]
        return None, "new", reviews

    def lookup(self, encodings: Encodings) -> dict[str, Any]:
        """Which EMPI a patient with ``encodings`` would get, without enrolling it."""
        if encodings.national_id is not None:
            row = self._db.execute("SELECT empi FROM enrolments WHERE national = ? ORDER BY height, id LIMIT 1",
                                   (encodings.national_id,)).fetchone()
            if row is not None:
                return {"empi": self.resolve(None, row[0]), "grade": "certain", "candidates": []}
        scored = []
        for other in self.candidates(self._db, encodings):
            s = matching.score(encodings, self._encodings(other))
            if matching.match_grade(s) is not None:
                scored.append((s, other))
        scored.sort(key=lambda item: matching.best_first(*item))
        candidates = [{"empi": self.empi_of(other), "enrolment": other.hex(), "grade": matching.match_grade(s),
                       "evidence": evidence_view(s)} for s, other in scored[:10]]
        if scored and matching.classify(scored[0][0]) == "link":
            return {"empi": candidates[0]["empi"], "grade": candidates[0]["grade"], "candidates": candidates}
        return {"empi": None, "grade": candidates[0]["grade"] if candidates else None, "candidates": candidates}

    def candidates(self, db: sqlite3.Connection, encodings: Encodings) -> list[bytes]:
        """Enrolments sharing a usable blocking key with ``encodings``, by id.

        Which keys are usable is ``matching.usable_blocks``: every node and the quality tool
        choose alike, from the block sizes alone. A block too common to say much, or one that
        would take the candidates past ``matching.MAX_CANDIDATES``, is skipped, so crafted keys
        that each share a big block cost a bounded number of scores. National-id keys are
        always used.
        """
        keys = matching.blocking_keys(encodings)
        if not keys:
            return []
        marks = ", ".join("?" * len(keys))
        sizes = dict(db.execute(f"SELECT key, COUNT(*) FROM blocking WHERE key IN ({marks}) GROUP BY key",
                                keys).fetchall())
        usable = matching.usable_blocks(sizes)
        if not usable:
            return []
        rows = db.execute(f"SELECT DISTINCT enrolment FROM blocking WHERE key IN ({', '.join('?' * len(usable))})",
                          usable).fetchall()
        return sorted(r[0] for r in rows)

    def _owner(self, db: sqlite3.Connection, enrolment: bytes) -> tuple[str, str] | None:
        """(institution, current EMPI) of an enrolment."""
        row = db.execute("SELECT institution, empi FROM enrolments WHERE id = ?", (enrolment,)).fetchone()
        return (row[0], row[1]) if row else None

    def _holders(self, db: sqlite3.Connection, *empis: str) -> set[str]:
        """The institutions holding an enrolment under any of ``empis`` (as they stand)."""
        marks = ",".join("?" * len(empis))
        return {r[0] for r in db.execute(f"SELECT DISTINCT institution FROM enrolments WHERE empi IN ({marks})",
                                         empis)}

    def _certain_match(self, db: sqlite3.Connection, enrolment: bytes, empi: str, institution: str) -> bool:
        """Whether the registry's own evidence makes ``enrolment`` a certain match of an
        enrolment of another institution under ``empi``."""
        mine = self._encodings(enrolment)
        for (other,) in db.execute("SELECT id FROM enrolments WHERE empi = ? AND institution != ? ORDER BY id "
                                   "LIMIT ?", (empi, institution, MAX_EVIDENCE)):
            if matching.match_grade(matching.score(mine, self._encodings(other))) == "certain":
                return True
        return False

    def _request(self, db: sqlite3.Connection, kind: str, body: dict[str, Any], submitter: str, height: int,
                 tx_id: bytes, empi: str, waiting: set[str]) -> str:
        db.execute("INSERT INTO empi_requests VALUES (?, ?, ?, ?, '[]', 'open', ?)",
                   (tx_id, kind, submitter, codec.encode(body), height))
        self._history(db, empi, height, tx_id, f"{kind}_requested",
                      f"{submitter} asks; waiting for {', '.join(sorted(waiting))}")
        return "ok"

    def _required(self, db: sqlite3.Connection, kind: str, body: dict[str, Any],
                  submitter: str) -> tuple[set[str], str] | str:
        """(institutions whose agreement a link or merge needs now, the EMPI it joins into),
        or the reason it cannot take effect as the registry stands."""
        if kind == "link":
            owner = self._owner(db, body["enrolment"])
            target = self.resolve(db, body["empi"])
            if owner is None or target is None:
                return "invalid:unknown"
            if owner[0] != submitter:
                return "invalid:not_owner"
            if owner[1] == target:
                return "invalid:same"
            return self._holders(db, target) - {submitter}, target
        source, target = self.resolve(db, body["from"]), self.resolve(db, body["into"])
        if source is None or target is None:
            return "invalid:unknown"
        if source == target:
            return "invalid:same"
        if not self._holders(db, source):
            return "invalid:empty"  # every enrolment has left it: nothing to merge
        holders = self._holders(db, source, target)
        if submitter not in holders:
            return "invalid:not_owner"  # only an institution with a patient in either may merge them
        return holders - {submitter}, target

    def _close_reviews(self, db: sqlite3.Connection, empi: str) -> None:
        """Open review items whose two enrolments are now one EMPI are settled."""
        db.execute("UPDATE review SET status = 'linked' WHERE status = 'open' AND "
                   "a IN (SELECT id FROM enrolments WHERE empi = ?) AND "
                   "b IN (SELECT id FROM enrolments WHERE empi = ?)",
                   (empi, empi))

    def link(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, tx_id: bytes) -> str:
        """An institution links one of its own enrolments to an EMPI: at once, or as a request
        the other institutions under that EMPI accept (see Authority above)."""
        required = self._required(db, "link", body, submitter)
        if isinstance(required, str):
            return required
        waiting, target = required
        if waiting and not self._certain_match(db, body["enrolment"], target, submitter):
            return self._request(db, "link", body, submitter, height, tx_id, target, waiting)
        self._link(db, body, submitter, target, height, tx_id)
        return "ok"

    def _link(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, target: str, height: int,
              tx_id: bytes) -> None:
        previous = db.execute("SELECT empi FROM enrolments WHERE id = ?", (body["enrolment"],)).fetchone()[0]
        db.execute("UPDATE enrolments SET empi = ? WHERE id = ?", (target, body["enrolment"]))
        self._close_reviews(db, target)
        detail = f"{submitter} linked {body['enrolment'].hex()} from {previous}"
        self._history(db, target, height, tx_id, "linked", detail)
        self._history(db, previous, height, tx_id, "unlinked", detail)

    def accept(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
               tx_id: bytes) -> str:
        """An institution under the EMPIs a held link or merge joins agrees to it; the last
        agreement needed makes it take effect."""
        row = db.execute("SELECT kind, submitter, body, accepted, status FROM empi_requests WHERE tx_id = ?",
                         (body["request"],)).fetchone()
        if row is None:
            return "invalid:unknown_request"
        kind, requester, raw, accepted_json, status = row
        if status != "open":
            return "invalid:decided"
        if submitter == requester:
            return "invalid:own_request"
        request = codec.decode(raw)
        required = self._required(db, kind, request, requester)
        if isinstance(required, str):
            return "invalid:stale"  # the registry changed under it: ask again
        waiting, target = required
        accepted = set(json.loads(accepted_json))
        if submitter not in waiting:
            return "invalid:not_holder"  # only an institution under the EMPIs it joins agrees
        if submitter in accepted:
            return "invalid:duplicate_accept"
        accepted.add(submitter)
        done = waiting <= accepted
        db.execute("UPDATE empi_requests SET accepted = ?, status = ? WHERE tx_id = ?",
                   (json.dumps(sorted(accepted)), "applied" if done else "open", body["request"]))
        self._history(db, target, height, tx_id, "accepted", f"{submitter} accepts the {kind} of {requester}")
        if done:
            if kind == "link":
                self._link(db, request, requester, target, height, body["request"])
            else:
                self._merge(db, request, requester, height, body["request"])
        return "ok"

    def split(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, tx_id: bytes) -> str:
        """An enrolment wrongly linked (twins, say) leaves its EMPI for a new one of its own."""
        owner = self._owner(db, body["enrolment"])
        if owner is None:
            return "invalid:unknown"
        if owner[0] != submitter:
            return "invalid:not_owner"
        row = (owner[1],)
        empi = new_empi(tx_id)
        db.execute("INSERT INTO empis VALUES (?, ?, NULL)", (empi, height))
        db.execute("UPDATE enrolments SET empi = ? WHERE id = ?", (empi, body["enrolment"]))
        detail = f"{submitter} split {body['enrolment'].hex()} from {row[0]}"
        self._history(db, empi, height, tx_id, "created", detail)
        self._history(db, row[0], height, tx_id, "split", detail)
        return "ok"

    def not_duplicate(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
                      tx_id: bytes) -> str:
        a, b = sorted((body["a"], body["b"]))
        owners = [self._owner(db, x) for x in (a, b)]
        if None in owners:
            return "invalid:unknown"
        if submitter not in {o[0] for o in owners if o}:
            return "invalid:not_owner"
        if db.execute("UPDATE review SET status = 'not_duplicate' WHERE a = ? AND b = ? AND status = 'open'",
                      (a, b)).rowcount != 1:
            return "invalid:not_open"
        for enrolment in (a, b):
            empi = db.execute("SELECT empi FROM enrolments WHERE id = ?", (enrolment,)).fetchone()[0]
            self._history(db, empi, height, tx_id, "not_duplicate", f"{submitter} {a.hex()} {b.hex()}")
        return "ok"

    def merge(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, tx_id: bytes) -> str:
        """Every enrolment of one EMPI moves into another: at once if the submitter is the only
        institution under either, else as a request the others accept (see Authority above)."""
        required = self._required(db, "merge", body, submitter)
        if isinstance(required, str):
            return required
        waiting, target = required
        if waiting:
            return self._request(db, "merge", body, submitter, height, tx_id, target, waiting)
        self._merge(db, body, submitter, height, tx_id)
        return "ok"

    def _merge(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
               tx_id: bytes) -> None:
        source, target = self.resolve(db, body["from"]), self.resolve(db, body["into"])
        assert source is not None and target is not None
        moved = [r[0] for r in db.execute("SELECT id FROM enrolments WHERE empi = ? ORDER BY id", (source,))]
        db.execute("UPDATE enrolments SET empi = ? WHERE empi = ?", (target, source))
        self._close_reviews(db, target)
        db.execute("UPDATE empis SET merged_into = ? WHERE empi = ?", (target, source))
        db.execute("INSERT INTO merges VALUES (?, ?, ?, ?, ?, 0)", (tx_id, source, target, codec.encode(moved), height))
        detail = f"{submitter} merged {source} into {target} ({len(moved)} enrolments)"
        self._history(db, target, height, tx_id, "merged", detail)
        self._history(db, source, height, tx_id, "merged_away", detail)

    def unmerge(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
                tx_id: bytes) -> str:
        row = db.execute("SELECT source, target, moved, undone FROM merges WHERE tx_id = ?",
                         (body["merge"],)).fetchone()
        if row is None:
            return "invalid:unknown"
        if row[3]:
            return "invalid:undone"
        source, target, moved = row[0], row[1], codec.decode(row[2])
        if db.execute("SELECT merged_into FROM empis WHERE empi = ?", (target,)).fetchone()[0] is not None:
            return "invalid:later_merge"  # the target was merged on since: undo that merge first
        if submitter not in self._holders(db, target) and not any(
                (self._owner(db, m) or ("",))[0] == submitter for m in moved):
            return "invalid:not_owner"
        db.executemany("UPDATE enrolments SET empi = ? WHERE id = ? AND empi = ?",
                       [(source, m, target) for m in moved])
        db.execute("UPDATE empis SET merged_into = NULL WHERE empi = ?", (source,))
        db.execute("UPDATE merges SET undone = 1 WHERE tx_id = ?", (body["merge"],))
        detail = f"{submitter} unmerged {source} from {target}"
        self._history(db, target, height, tx_id, "unmerged", detail)
        self._history(db, source, height, tx_id, "restored", detail)
        return "ok"

    def _history(self, db: sqlite3.Connection, empi: str, height: int, tx_id: bytes, event: str,
                 detail: str) -> None:
        db.execute("INSERT INTO empi_history (empi, height, tx_id, event, detail) VALUES (?, ?, ?, ?, ?)",
                   (empi, height, tx_id, event, detail))

    # --- reading ------------------------------------------------------------------------

    def resolve(self, db: sqlite3.Connection | None, empi: str) -> str | None:
        """The EMPI ``empi`` stands for now (following merges), or None if unknown."""
        db = db or self._db
        # Merges only join two EMPIs that are both current, so the chain has no cycle.
        while True:
            row = db.execute("SELECT merged_into FROM empis WHERE empi = ?", (empi,)).fetchone()
            if row is None:
                return None
            if row[0] is None:
                return empi
            empi = row[0]

    def aliases(self, empi: str) -> list[str]:
        """``empi`` as it stands now, and every EMPI merged into it (at any depth); [] if unknown."""
        current = self.resolve(None, empi)
        if current is None:
            return []
        found, frontier = [current], [current]
        while frontier:
            rows = self._db.execute(
                f"SELECT empi FROM empis WHERE merged_into IN ({', '.join('?' * len(frontier))})", frontier).fetchall()
            frontier = [r[0] for r in rows if r[0] not in found]
            found.extend(frontier)
        return found

    def enrolments_of(self, empi: str) -> list[bytes]:
        current = self.resolve(None, empi)
        if current is None:
            return []
        return [r[0] for r in self._db.execute("SELECT id FROM enrolments WHERE empi = ? ORDER BY id", (current,))]

    def institutions_of(self, empi: str) -> set[str]:
        """The institutions that have this patient enrolled (under the EMPI as it stands now)."""
        current = self.resolve(None, empi)
        if current is None:
            return set()
        return {r[0] for r in self._db.execute("SELECT DISTINCT institution FROM enrolments WHERE empi = ?",
                                               (current,))}

    def empi_of(self, enrolment: bytes) -> str | None:
        row = self._db.execute("SELECT empi FROM enrolments WHERE id = ?", (enrolment,)).fetchone()
        return row[0] if row else None

    def review_queue(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT a, b, score, height FROM review WHERE status = 'open' ORDER BY height, a, b")
        out = []
        for a, b, score, height in rows.fetchall():
            ea, eb = (self._db.execute("SELECT institution, empi, encodings FROM enrolments WHERE id = ?",
                                       (x,)).fetchone() for x in (a, b))
            evidence = matching.score(self._encodings(a, ea[2]), self._encodings(b, eb[2]))
            out.append({
                "a": {"enrolment": a.hex(), "institution": ea[0], "empi": ea[1]},
                "b": {"enrolment": b.hex(), "institution": eb[0], "empi": eb[1]},
                "score": score, "height": height, "evidence": evidence_view(evidence),
            })
        return out

    def request(self, tx_id: bytes) -> dict[str, Any] | None:
        """The held link or merge made by transaction ``tx_id``, while still open."""
        found = self._requests("AND tx_id = ?", (tx_id,))
        return found[0] if found else None

    def requests(self, institution: str | None = None) -> list[dict[str, Any]]:
        """Held links and merges still open, oldest first, each with who has agreed and who
        it waits for; with ``institution``, only those waiting for it or made by it."""
        return self._requests("", (), institution)

    def _requests(self, where: str, args: tuple[Any, ...], institution: str | None = None) -> list[dict[str, Any]]:
        out = []
        rows = self._db.execute("SELECT tx_id, kind, submitter, body, accepted, height FROM empi_requests "
                                f"WHERE status = 'open' {where} ORDER BY height, tx_id", args).fetchall()
        for tx_id, kind, requester, raw, accepted_json, height in rows:
            body = codec.decode(raw)
            required = self._required(self._db, kind, body, requester)
            accepted = json.loads(accepted_json)
            waiting = sorted(required[0] - set(accepted)) if not isinstance(required, str) else []
            if institution is not None and institution != requester and institution not in waiting:
                continue
            view = {"request": tx_id.hex(), "kind": kind, "requester": requester, "height": height,
                    "accepted": accepted, "waiting": waiting,
                    "stale": required if isinstance(required, str) else None}
            if kind == "link":
                view.update(enrolment=body["enrolment"].hex(), empi=body["empi"])
            else:
                view.update({"from": body["from"], "into": body["into"]})
            out.append(view)
        return out

    def history(self, empi: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT empi, height, tx_id, event, detail FROM empi_history WHERE empi = ? ORDER BY seq", (empi,))
        return [{"empi": e, "height": h, "tx_id": t.hex(), "event": ev, "detail": d} for e, h, t, ev, d in rows]


def evidence_view(score: matching.Score) -> dict[str, Any]:
    """A score as a curator reads it: per field, Dice (per mille), agreement level and weight."""
    return {
        "total": score.total, "grade": matching.match_grade(score), "decision": matching.classify(score),
        "national_id": score.national_id, "names_swapped": score.names_swapped, "sex_weight": score.sex_weight,
        "moved": score.moved, "moved_weight": score.moved_weight, "household": score.household,
        "fields": [{"field": f.field, "dice": f.dice, "level": f.level, "weight": f.weight, "counted": f.counted}
                   for f in score.fields],
    }
