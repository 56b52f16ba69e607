"""Governed membership: proposals, votes, and the membership each consensus epoch runs with.

A member proposes a change (``consortium.propose``: add a member, remove one, or
replace a member's keys) and the current validators vote for it
(``consortium.vote``; the proposal is its proposer's vote). In the block where
votes from 2f+1 of the current members are reached, the proposal is *adopted*:
that block is the last of its consensus epoch, and the next epoch starts at the
following block with the changed membership (:class:`~ehrnode.membership.Membership`).
Every node applies the same blocks in the same order, so every node adopts at
the same block and derives the same validator set; ``docs/consensus.md``
("Epochs") says why the change leaves no gap in safety.

An adoption closes the epoch: every other proposal still open *lapses* (it was
put to validators that are no longer the ones deciding), as does a governance
transaction later in the same block. An ``add`` or ``rotate-key`` proposal
carries the key of every epoch so far sealed to the member's sealing key; if a
new epoch key is opened before it is adopted, that history is short of one key
and the proposal lapses too. Lapsed proposals are proposed again.

Proposals and votes travel in public-class envelopes (:mod:`.envelope`): a member
that joins later reads them, and learns the keys sealed to it, before it holds
any epoch key. Nothing in them is about patients.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .. import codec
from ..config import Address, Member
from ..errors import ConfigError
from ..membership import Membership
from .transactions import Transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS memberships (
    epoch INTEGER PRIMARY KEY, starts INTEGER NOT NULL, members BLOB NOT NULL, proposal BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    id BLOB PRIMARY KEY, change TEXT NOT NULL, name TEXT NOT NULL, reason TEXT NOT NULL, body BLOB NOT NULL,
    proposer TEXT NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL, epoch INTEGER NOT NULL,
    status TEXT NOT NULL, decided INTEGER);
CREATE TABLE IF NOT EXISTS votes (
    proposal BLOB NOT NULL, voter TEXT NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL,
    PRIMARY KEY (proposal, voter));
"""

PROPOSAL_COLUMNS = ("id", "change", "name", "reason", "proposer", "time", "height", "epoch", "status", "decided")


def encode_members(members: tuple[Member, ...]) -> bytes:
    return codec.encode([[m.name, m.role, m.signing_key, m.sealing_key, str(m.address)] for m in members])


def decode_members(data: bytes) -> tuple[Member, ...]:
    return tuple(Member(name, role, signing, sealing, Address.parse(address, "membership"))
                 for name, role, signing, sealing, address in codec.decode(data))


def proposed_member(body: dict[str, Any], current: Membership) -> Member:
    """The member a proposal's body describes (for ``remove``: the member as it is now)."""
    if body["change"] == "remove":
        return current.member(body["name"])
    role = body["role"] if body["change"] == "add" else current.member(body["name"]).role
    return Member(body["name"], role, body["signing_key"], body["sealing_key"],
                  Address.parse(body["address"], "consortium.propose.address"))


class Governance:
    """The proposals, votes and memberships of one ledger state (its tables, in its database)."""

    def __init__(self, db: sqlite3.Connection, genesis: Membership) -> None:
        self._db = db
        self._genesis = genesis
        self.memberships: list[Membership] = []
        self.reload()

    def reload(self) -> None:
        """Read the memberships again (after a block that adopted a change is stored)."""
        self.memberships = [self._genesis] + [
            Membership(epoch, starts, decode_members(members))
            for epoch, starts, members in self._db.execute("SELECT epoch, starts, members FROM memberships "
                                                           "ORDER BY epoch")]

    def at(self, height: int) -> Membership:
        """The membership of the consensus epoch block ``height`` is in."""
        for membership in reversed(self.memberships):
            if membership.starts <= height:
                return membership
        return self.memberships[0]

    def of_epoch(self, epoch: int) -> Membership:
        """The membership of consensus epoch ``epoch`` (they are numbered from 0 without gaps)."""
        return self.memberships[epoch]

    @property
    def latest(self) -> Membership:
        """The newest membership (it may start with the next block)."""
        return self.memberships[-1]

    def signing_keys_of(self, name: str) -> set[bytes]:
        """Every signing key ``name`` has been listed with (a rotate-key replaces it)."""
        return {m.signing_key for membership in self.memberships if (m := membership.get(name)) is not None}

    def former(self, name: str) -> bool:
        """Whether ``name`` was ever a member."""
        return any(name in m for m in self.memberships)

    # --- applying ----------------------------------------------------------------------

    def apply(self, db: sqlite3.Connection, tx: Transaction, height: int, key_epochs: int) -> str:
        """Apply a proposal or vote in block ``height``; returns its status. ``key_epochs``: how
        many epoch keys have been opened (the history an add or rotate-key must carry)."""
        current = self.at(height)
        if db.execute("SELECT 1 FROM memberships WHERE starts = ?", (height + 1,)).fetchone():
            return "invalid:epoch_ended"  # this block adopted a change already
        if tx.kind == "consortium.propose":
            status = self._propose(db, tx, current, height, key_epochs)
            proposal = tx.id
        else:
            proposal = tx.body["proposal"]
            status = self._vote(db, tx, proposal, height)
        if status == "ok":
            self._maybe_adopt(db, proposal, current, height)
        return status

    def _propose(self, db: sqlite3.Connection, tx: Transaction, current: Membership, height: int,
                 key_epochs: int) -> str:
        body, name = tx.body, tx.body["name"]
        change = body["change"]
        if change == "add" and self.former(name):
            return "invalid:name_taken"  # names stay unique for good: anchors and logs refer to them
        if change != "add" and name not in current:
            return "invalid:not_member"
        if change == "remove" and len(current) < 2:
            return "invalid:last_member"
        if change != "remove":
            used = {key for m in current for key in (m.signing_key, m.sealing_key)}
            if body["signing_key"] in used or body["sealing_key"] in used or body["signing_key"] == body["sealing_key"]:
                return "invalid:key_reused"
            if len(body["history"]) != key_epochs:
                return "invalid:history"  # one sealed key per epoch opened so far, no more
            try:
                Address.parse(body["address"], "consortium.propose.address")
            except ConfigError:
                return "invalid:address"  # never adopted, so never a member nobody can reach
        db.execute("INSERT INTO proposals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)", (
            tx.id, change, name, body["reason"], codec.encode(body), tx.submitter, tx.time, height, current.epoch,
            "open"))
        db.execute("INSERT INTO votes VALUES (?, ?, ?, ?)", (tx.id, tx.submitter, height, tx.id))
        return "ok"

    def _vote(self, db: sqlite3.Connection, tx: Transaction, proposal: bytes, height: int) -> str:
        row = db.execute("SELECT status FROM proposals WHERE id = ?", (proposal,)).fetchone()
        if row is None:
            return "invalid:unknown_proposal"
        if row[0] != "open":
            return "invalid:decided"
        if db.execute("SELECT 1 FROM votes WHERE proposal = ? AND voter = ?", (proposal, tx.submitter)).fetchone():
            return "invalid:duplicate_vote"
        db.execute("INSERT INTO votes VALUES (?, ?, ?, ?)", (proposal, tx.submitter, height, tx.id))
        return "ok"

    def _maybe_adopt(self, db: sqlite3.Connection, proposal: bytes, current: Membership, height: int) -> None:
        voters = {voter for (voter,) in db.execute("SELECT voter FROM votes WHERE proposal = ?", (proposal,))}
        if len(voters & set(current.names)) < current.quorum:
            return
        body = codec.decode(db.execute("SELECT body FROM proposals WHERE id = ?", (proposal,)).fetchone()[0])
        following = current.changed(body["change"], proposed_member(body, current), height + 1)
        db.execute("UPDATE proposals SET status = 'lapsed', decided = ? WHERE status = 'open' AND id != ?",
                   (height, proposal))
        db.execute("UPDATE proposals SET status = 'adopted', decided = ? WHERE id = ?", (height, proposal))
        db.execute("INSERT INTO memberships VALUES (?, ?, ?, ?)",
                   (following.epoch, following.starts, encode_members(following.members), proposal))

    def lapse_history(self, db: sqlite3.Connection, height: int) -> None:
        """A new epoch key was opened: open proposals whose history lacks it lapse."""
        db.execute("UPDATE proposals SET status = 'lapsed', decided = ? WHERE status = 'open' AND change != 'remove'",
                   (height,))

    # --- views -------------------------------------------------------------------------

    def proposals_by_id(self, proposal: bytes) -> dict[str, Any] | None:
        found = self.proposals(proposal=proposal)
        return found[0] if found else None

    def proposals(self, *, status: str | None = None, proposal: bytes | None = None) -> list[dict[str, Any]]:
        """Proposals (newest first), each with its voters and the votes it needs."""
        sql = f"SELECT {', '.join(PROPOSAL_COLUMNS)}, body FROM proposals"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        elif proposal is not None:
            sql += " WHERE id = ?"
            args = (proposal,)
        out = []
        for row in self._db.execute(sql + " ORDER BY height DESC, rowid DESC", args).fetchall():
            view = dict(zip(PROPOSAL_COLUMNS, row[:-1], strict=True))
            body = codec.decode(row[-1])
            view["member"] = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in body.items()
                              if k in ("role", "signing_key", "sealing_key", "address")}
            view["voters"] = [v for (v,) in self._db.execute(
                "SELECT voter FROM votes WHERE proposal = ? ORDER BY height, rowid", (view["id"],))]
            view["needed"] = self.at(view["height"]).quorum
            out.append(view)
        return out

    def histories_for(self, name: str) -> list[dict[str, Any]]:
        """The bodies of every add or rotate-key proposal naming ``name`` (each carries history)."""
        return [codec.decode(body) for (body,) in self._db.execute(
            "SELECT body FROM proposals WHERE name = ? AND change != 'remove' ORDER BY height, rowid", (name,))]

    def proposal_body(self, proposal: bytes) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM proposals WHERE id = ?", (proposal,)).fetchone()
        return codec.decode(row[0]) if row else None
