"""The OPRF key's rounds on the chain: its distributed generation, and its resharing.

Every node applies the same rules to the same blocks, so every node agrees on which
round is current, who deals and holds shares in it, and, once it completes, every
participant's public share. The secrets themselves never reach the chain in the
clear: each share travels sealed to its holder (:mod:`ehrnode.empi.dkg` has the
arithmetic).

A round's life
--------------
* **Opened** at genesis (round 0) and whenever the institutions (their names or
  sealing keys) differ from the latest round's participants, after a membership
  change is adopted. Participants are the institutions, in name order (index = place
  + 1); the threshold is a majority (:func:`~ehrnode.empi.dkg.threshold_for`). A round
  is a *reshare* of the last completed one if enough of that round's holders are
  still institutions to reach its threshold (they are its dealers, each dealing its
  own share, so the key stays the same); otherwise it is *fresh* (every participant
  deals a random secret, and the key is new: encodings made under an earlier key no
  longer compare, which the node reports).
* **Dealing** (``keys.oprf_deal``): each dealer deals once. A reshare dealing must
  start from the dealer's public share in the round it reshares (``C_0 = K_i``),
  which the chain checks. When every dealer has dealt, the round is verifying.
* **Verifying** (``keys.oprf_verdict``): each participant opens the shares dealt to it
  and lists the dealers whose share does not match their commitments. An accused
  dealer answers with ``keys.oprf_reveal``: the share in the clear, which the chain
  checks against the commitments. A share that matches settles the complaint (the
  complainer uses the revealed share); one that does not disqualifies the dealer.
* **Complete** when every participant has given its verdict and no complaint is
  open: the qualified dealers' dealings (for a reshare, the first ``t`` of them by
  index, weighted by their Lagrange coefficients) give every participant's public
  share. A fresh round with fewer than ``t`` qualified dealers, or a reshare with
  fewer than its predecessor's ``t``, *fails*; the next membership change opens
  another.

* **Closed early** (``keys.oprf_close``): a phase that has waited ``PHASE_WINDOW_MS`` of block
  time for a participant that does not speak (a member down, for maintenance or for good) may be
  closed by any participant with those who took part: a dealing phase if enough dealt to reach
  the threshold the key needs (they become the round's dealers), a verifying phase if a
  threshold of participants gave verdicts and no complaint is open. A complaint left
  unanswered for a window counts as a failed reveal: closing then disqualifies its dealer. Who a round
  waits for is in ``ehrnode status``; evaluations use the latest completed round meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import codec
from ..empi import dkg, oprf
from ..errors import CryptoError, SchemaError
from ..membership import Membership
from .transactions import Transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS oprf_rounds (
    round INTEGER PRIMARY KEY, mode TEXT NOT NULL, participants BLOB NOT NULL, threshold INTEGER NOT NULL,
    dealers BLOB NOT NULL, reshares INTEGER, opened INTEGER NOT NULL, status TEXT NOT NULL, closed INTEGER,
    qualified BLOB, public_shares BLOB, public_key BLOB, phase_time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS oprf_dealings (
    round INTEGER NOT NULL, dealer TEXT NOT NULL, body BLOB NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL,
    PRIMARY KEY (round, dealer));
CREATE TABLE IF NOT EXISTS oprf_verdicts (
    round INTEGER NOT NULL, member TEXT NOT NULL, complaints BLOB NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (round, member));
CREATE TABLE IF NOT EXISTS oprf_complaints (
    round INTEGER NOT NULL, dealer TEXT NOT NULL, complainer TEXT NOT NULL, status TEXT NOT NULL, share BLOB,
    filed INTEGER NOT NULL, PRIMARY KEY (round, dealer, complainer));
"""

KINDS = ("keys.oprf_deal", "keys.oprf_verdict", "keys.oprf_reveal", "keys.oprf_close")
#: How long (block time) a phase waits for everyone before a participant may close it with whoever
#: took part: a member down, for maintenance or for good, does not hold up the key.
PHASE_WINDOW_MS = 120_000


@dataclass(frozen=True)
class Round:
    """One round as the chain has it."""

    number: int
    mode: str                                   # "fresh" or "reshare"
    participants: tuple[tuple[str, bytes], ...]  # (name, sealing key), in name order
    threshold: int
    dealers: tuple[str, ...]
    reshares: int | None                        # the round a reshare starts from
    opened: int
    status: str                                 # dealing, verifying, complete, failed, superseded
    closed: int | None
    qualified: tuple[str, ...]
    public_shares: Mapping[str, bytes]
    public_key: bytes | None
    phase_time: int                             # block time the current phase started

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.participants]

    def index(self, name: str) -> int:
        """A participant's share index (1-based)."""
        return self.names.index(name) + 1

    def sealing_key(self, name: str) -> bytes:
        return dict(self.participants)[name]


_ROUND_COLUMNS = ("round, mode, participants, threshold, dealers, reshares, opened, status, closed, qualified, "
                  "public_shares, public_key, phase_time")


def _round(row: Sequence[Any]) -> Round:
    number, mode, participants, threshold, dealers, reshares, opened, status, closed, qualified, shares, key, \
        phase_time = row
    return Round(number, mode, tuple((n, k) for n, k in codec.decode(participants)), threshold,
                 tuple(codec.decode(dealers)), reshares, opened, status, closed,
                 tuple(codec.decode(qualified)) if qualified else (), codec.decode(shares) if shares else {}, key,
                 phase_time)


class OprfRounds:
    """Reads and applies the rounds in one ledger database (the caller holds the write transaction)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- reading ------------------------------------------------------------------------------------

    def latest(self) -> Round | None:
        row = self._db.execute(f"SELECT {_ROUND_COLUMNS} FROM oprf_rounds ORDER BY round DESC LIMIT 1").fetchone()
        return _round(row) if row else None

    def get(self, number: int) -> Round | None:
        row = self._db.execute(f"SELECT {_ROUND_COLUMNS} FROM oprf_rounds WHERE round = ?", (number,)).fetchone()
        return _round(row) if row else None

    def current(self) -> Round | None:
        """The latest completed round: the one evaluations use."""
        row = self._db.execute(f"SELECT {_ROUND_COLUMNS} FROM oprf_rounds WHERE status = 'complete' "
                               "ORDER BY round DESC LIMIT 1").fetchone()
        return _round(row) if row else None

    def dealt(self, number: int) -> set[str]:
        """Who has dealt in a round (without reading their dealings)."""
        return {d for (d,) in self._db.execute("SELECT dealer FROM oprf_dealings WHERE round = ?", (number,))}

    def dealing(self, number: int, dealer: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM oprf_dealings WHERE round = ? AND dealer = ?",
                               (number, dealer)).fetchone()
        return codec.decode(row[0]) if row else None

    def dealings(self, number: int) -> dict[str, dict[str, Any]]:
        return {dealer: codec.decode(body) for dealer, body in self._db.execute(
            "SELECT dealer, body FROM oprf_dealings WHERE round = ?", (number,))}

    def verdicts(self, number: int) -> dict[str, list[str]]:
        return {member: codec.decode(c) for member, c in self._db.execute(
            "SELECT member, complaints FROM oprf_verdicts WHERE round = ?", (number,))}

    def complaints(self, number: int) -> list[dict[str, Any]]:
        return [{"dealer": d, "complainer": c, "status": s, "share": share, "filed": filed}
                for d, c, s, share, filed in self._db.execute(
                    "SELECT dealer, complainer, status, share, filed FROM oprf_complaints WHERE round = ? "
                    "ORDER BY dealer, complainer", (number,))]

    def weights(self, r: Round) -> dict[str, int]:
        """Each qualified dealer's weight in a completed round: 1 in a fresh round, its Lagrange
        coefficient over its indices in the reshared round otherwise."""
        if r.mode == "fresh":
            return {d: 1 for d in r.qualified}
        previous = self.get(r.reshares or 0)
        assert previous is not None
        indices = [previous.index(d) for d in r.qualified]
        return {d: oprf.lagrange_at_zero(indices, previous.index(d)) for d in r.qualified}

    def view(self) -> dict[str, Any] | None:
        """The latest round for status displays (JSON-ready)."""
        r = self.latest()
        if r is None:
            return None
        dealt, verdicts = self.dealt(r.number), self.verdicts(r.number)
        waiting: list[str] = []
        if r.status == "dealing":
            waiting = [d for d in r.dealers if d not in dealt]
        elif r.status == "verifying":
            waiting = [n for n in r.names if n not in verdicts] + sorted(
                {c["dealer"] for c in self.complaints(r.number) if c["status"] == "open"})
        current = self.current()
        return {"round": r.number, "mode": r.mode, "status": r.status, "threshold": r.threshold,
                "participants": r.names, "waiting_for": waiting,
                "current": current.number if current else None,
                "public_key": current.public_key.hex() if current and current.public_key else None}

    # -- applying ------------------------------------------------------------------------------------

    def sync(self, db: sqlite3.Connection, membership: Membership, height: int, block_time: int) -> Round | None:
        """Open a round if the institutions of ``membership`` (in force from ``height``) are not the
        latest round's participants; the round opened, if any."""
        institutions = tuple(sorted((m.name, m.sealing_key) for m in membership if m.role == "institution"))
        if not institutions or len(institutions) > dkg.MAX_PARTICIPANTS:
            return None
        latest = self.latest()
        if latest is not None and latest.participants == institutions:
            return None
        number = latest.number + 1 if latest else 0
        if latest is not None and latest.status in ("dealing", "verifying"):
            db.execute("UPDATE oprf_rounds SET status = 'superseded', closed = ? WHERE round = ?",
                       (height, latest.number))
        current = self.current()
        names = {n for n, _ in institutions}
        staying = [n for n in current.names if n in names] if current else []
        if current is not None and len(staying) >= current.threshold:
            mode, dealers, reshares = "reshare", staying, current.number
        else:
            mode, dealers, reshares = "fresh", [n for n, _ in institutions], None
        db.execute("INSERT INTO oprf_rounds VALUES (?, ?, ?, ?, ?, ?, ?, 'dealing', NULL, NULL, NULL, NULL, ?)", (
            number, mode, codec.encode([list(p) for p in institutions]), dkg.threshold_for(len(institutions)),
            codec.encode(dealers), reshares, height, block_time))
        return self.get(number)

    def apply(self, db: sqlite3.Connection, tx: Transaction, height: int, block_time: int) -> str:
        """Apply one round transaction; its status (``ok`` or ``invalid:<reason>``)."""
        r = self.get(tx.body["round"])
        if r is None:
            return "invalid:unknown_round"
        if tx.kind == "keys.oprf_deal":
            status = self._deal(db, r, tx, height)
        elif tx.kind == "keys.oprf_verdict":
            status = self._verdict(db, r, tx, height, block_time)
        elif tx.kind == "keys.oprf_reveal":
            status = self._reveal(db, r, tx)
        else:
            status = self._close(db, r, tx, block_time)
        if status == "ok":
            self._advance(db, r.number, height, block_time)
        return status

    def closable(self, r: Round, now_ms: int) -> bool:
        """Whether a participant may close the round's phase at ``now_ms`` (block time): the window
        has passed and enough took part (dealers to reach the threshold the key needs; verdicts from
        a threshold of participants, with no complaint open)."""
        if now_ms - r.phase_time < PHASE_WINDOW_MS:
            return False
        if r.status == "dealing":
            return len(self.dealt(r.number)) >= self._dealers_needed(r)
        if r.status == "verifying":
            # A complaint left unanswered for a window counts against its dealer: a dealer that
            # will not reveal cannot hold the round up.
            return (len(self.verdicts(r.number)) >= r.threshold
                    and not any(c["status"] == "open" and now_ms - c["filed"] < PHASE_WINDOW_MS
                                for c in self.complaints(r.number)))
        return False

    def _dealers_needed(self, r: Round) -> int:
        if r.mode == "reshare":
            previous = self.get(r.reshares or 0)
            return previous.threshold if previous is not None else r.threshold
        return r.threshold

    def _close(self, db: sqlite3.Connection, r: Round, tx: Transaction, block_time: int) -> str:
        if tx.submitter not in r.names:
            return "invalid:not_a_participant"
        if r.status not in ("dealing", "verifying"):
            return "invalid:not_open"
        if not self.closable(r, block_time):
            return "invalid:not_closable"
        if r.status == "dealing":
            # The round goes on with the dealers that dealt; the others' shares are not in it.
            dealt = self.dealt(r.number)
            db.execute("UPDATE oprf_rounds SET dealers = ?, status = 'verifying', phase_time = ? WHERE round = ?",
                       (codec.encode([d for d in r.dealers if d in dealt]), block_time, r.number))
        else:
            db.execute("UPDATE oprf_complaints SET status = 'unanswered' WHERE round = ? AND status = 'open'",
                       (r.number,))
            db.execute("UPDATE oprf_rounds SET status = 'closing' WHERE round = ?", (r.number,))
        return "ok"

    def _deal(self, db: sqlite3.Connection, r: Round, tx: Transaction, height: int) -> str:
        if r.status != "dealing":
            return "invalid:not_dealing"
        if tx.submitter not in r.dealers:
            return "invalid:not_a_dealer"
        if tx.submitter in self.dealt(r.number):
            return "invalid:dealt"
        try:
            points = dkg.check_dealing_body(tx.body, r.threshold, r.names)
            # A polynomial that is zero at some participant's index would give that participant
            # no share (and a public share with no encoding): refused, whoever it is zero at.
            for name in r.names:
                dkg.committed_value(points, r.index(name))
        except (SchemaError, CryptoError):
            return "invalid:malformed_dealing"
        if r.mode == "reshare":
            previous = self.get(r.reshares or 0)
            if previous is None or tx.body["commitments"][0] != previous.public_shares.get(tx.submitter):
                return "invalid:not_the_dealers_share"
        db.execute("INSERT INTO oprf_dealings VALUES (?, ?, ?, ?, ?)",
                   (r.number, tx.submitter, codec.encode(tx.body), height, tx.id))
        return "ok"

    def _verdict(self, db: sqlite3.Connection, r: Round, tx: Transaction, height: int, block_time: int) -> str:
        if r.status != "verifying":
            return "invalid:not_verifying"
        if tx.submitter not in r.names:
            return "invalid:not_a_participant"
        if db.execute("SELECT 1 FROM oprf_verdicts WHERE round = ? AND member = ?",
                      (r.number, tx.submitter)).fetchone():
            return "invalid:verdict_given"
        complaints = tx.body["complaints"]
        if any(d not in r.dealers or d == tx.submitter for d in complaints):
            return "invalid:not_a_dealer"
        db.execute("INSERT INTO oprf_verdicts VALUES (?, ?, ?, ?)",
                   (r.number, tx.submitter, codec.encode(sorted(complaints)), height))
        for dealer in complaints:
            db.execute("INSERT INTO oprf_complaints VALUES (?, ?, ?, 'open', NULL, ?)",
                       (r.number, dealer, tx.submitter, block_time))
        return "ok"

    def _reveal(self, db: sqlite3.Connection, r: Round, tx: Transaction) -> str:
        if r.status != "verifying":
            return "invalid:not_verifying"
        row = db.execute("SELECT status FROM oprf_complaints WHERE round = ? AND dealer = ? AND complainer = ?",
                         (r.number, tx.submitter, tx.body["complainer"])).fetchone()
        if row is None or row[0] != "open":
            return "invalid:no_open_complaint"
        dealing = self.dealing(r.number, tx.submitter)
        assert dealing is not None  # a complaint names a dealer that dealt
        share = int.from_bytes(tx.body["share"], "big")
        try:
            points = [oprf.decode_point(c) for c in dealing["commitments"]]
        except CryptoError:
            return "invalid:malformed_dealing"
        good = dkg.check_share(points, r.index(tx.body["complainer"]), share)
        db.execute("UPDATE oprf_complaints SET status = ?, share = ? WHERE round = ? AND dealer = ? AND complainer = ?",
                   ("answered" if good else "failed", tx.body["share"], r.number, tx.submitter,
                    tx.body["complainer"]))
        return "ok"

    def _advance(self, db: sqlite3.Connection, number: int, height: int, block_time: int) -> None:
        r = self.get(number)
        assert r is not None
        if r.status == "dealing":
            if self.dealt(number) >= set(r.dealers):
                db.execute("UPDATE oprf_rounds SET status = 'verifying', phase_time = ? WHERE round = ?",
                           (block_time, number))
            return
        complaints = self.complaints(number)
        if r.status == "closing":            # closed with the verdicts given (checked by _close)
            pass
        elif r.status != "verifying" or set(self.verdicts(number)) < set(r.names) or any(
                c["status"] == "open" for c in complaints):
            return
        failed = {c["dealer"] for c in complaints if c["status"] in ("failed", "unanswered")}
        qualified = [d for d in sorted(r.dealers, key=self._dealer_order(r)) if d not in failed]
        if r.mode == "reshare":
            previous = self.get(r.reshares or 0)
            assert previous is not None
            qualified = qualified[:previous.threshold]
            enough = len(qualified) == previous.threshold
        else:
            enough = len(qualified) >= r.threshold
        if not enough:
            db.execute("UPDATE oprf_rounds SET status = 'failed', closed = ?, qualified = ? WHERE round = ?",
                       (height, codec.encode(qualified), number))
            return
        done = replace(r, qualified=tuple(qualified))
        weights = self.weights(done)
        dealings = self.dealings(number)
        by_index = {i: [oprf.decode_point(c) for c in dealings[d]["commitments"]]
                    for i, d in enumerate(qualified)}
        try:
            public, key = dkg.round_result(by_index, {i: weights[d] for i, d in enumerate(qualified)},
                                           [r.index(n) for n in r.names])
        except CryptoError:
            # A share or the key would be the identity: cancelled dealings (a colluding choice of
            # polynomials). The round fails, every node alike; the next change opens another.
            db.execute("UPDATE oprf_rounds SET status = 'failed', closed = ?, qualified = ? WHERE round = ?",
                       (height, codec.encode(qualified), number))
            return
        shares = {n: oprf.encode_point(public[r.index(n)]) for n in r.names}
        db.execute("UPDATE oprf_rounds SET status = 'complete', closed = ?, qualified = ?, public_shares = ?, "
                   "public_key = ? WHERE round = ?", (height, codec.encode(qualified), codec.encode(shares),
                                                      oprf.encode_point(key), number))

    def _dealer_order(self, r: Round) -> Any:
        """Dealers ordered by their index in the round they deal from (reshare) or in this one."""
        order = self.get(r.reshares) if r.mode == "reshare" and r.reshares is not None else r
        assert order is not None
        return order.index
