"""Admission and holding of transactions until they are committed.

What arrives is an envelope (:mod:`.envelope`). It gets in only if it decodes
strictly, names a current member as signer, is sealed under the current epoch
(or the one before), opens under that epoch's key to a transaction of the same
signer and class, for this chain, signed by its submitter, that is new (neither
pending nor committed, under any envelope), and there is room. The checks run
cheapest first, so a gossiped duplicate costs a hash lookup, not a decryption
or a signature verification. The pool is bounded: when full, the submitter is
told "mempool full" instead of the pool growing; and no member's transactions
take more than ``MEMBER_SHARE`` of it (``member_quota``), so one member that
floods the network cannot keep the others' transactions out.

Pending transactions are held by envelope id (what consensus proposes and a
block carries) and found by transaction id (what submitters wait on).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from .. import crypto
from ..errors import AdmissionError, KeyUnavailable
from ..limits import Holdings
from .envelope import MAX_ENVELOPE_BYTES, Envelope
from .transactions import Transaction

#: The part of the pool one member's transactions may take (when there are several members).
MEMBER_SHARE = 0.5

#: Decode and open an envelope for the next block (see :meth:`LedgerState.open_envelope`).
Opener = Callable[[bytes], tuple[Envelope, Transaction]]


class Mempool:
    def __init__(
        self, chain_id: str, members: Mapping[str, bytes], *, opener: Opener, capacity: int = 50_000,
        is_committed: Callable[[bytes], bool] = lambda _id: False,
    ) -> None:
        self.chain_id = chain_id
        self.members = dict(members)
        self.capacity = capacity
        self._open = opener
        self._is_committed = is_committed
        self._pending: OrderedDict[bytes, Transaction] = OrderedDict()  # envelope id -> transaction
        self._by_tx: dict[bytes, bytes] = {}  # transaction id -> envelope id
        self._checked: set[bytes] = set()  # envelope ids admitted from the wire (opened and verified here)
        self._envelopes: dict[bytes, Envelope] = {}  # envelope id -> the envelope, decoded or sealed here
        self._held_by = Holdings()  # submitter -> its transactions pending
        # Envelopes committed lately: gossip still queued when a block carried them is refused
        # before it is opened and its signature checked again (the same bytes, the same transaction).
        self._committed: OrderedDict[bytes, None] = OrderedDict()

    def set_members(self, members: Mapping[str, bytes]) -> None:
        """Admit from now on transactions signed by ``members`` (name -> signing key): a membership change."""
        self.members = dict(members)

    @property
    def member_quota(self) -> int:
        """Transactions of one submitter the pool holds at most."""
        return self.capacity if len(self.members) <= 1 else max(1, int(self.capacity * MEMBER_SHARE))

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, tx_id: bytes) -> bool:
        """Whether the transaction ``tx_id`` is pending (under whichever envelope)."""
        return tx_id in self._by_tx

    def pending_of(self, submitter: str) -> int:
        """How many of ``submitter``'s transactions are pending."""
        return self._held_by.of(submitter)

    def get(self, envelope_id: bytes) -> Transaction | None:
        """The transaction in this envelope if it came in through :meth:`admit`: opened from
        exactly these bytes and its signature checked (own transactions: None)."""
        return self._pending.get(envelope_id) if envelope_id in self._checked else None

    def envelope(self, envelope_id: bytes) -> Envelope | None:
        """The pending envelope ``envelope_id``, as decoded when admitted (or as sealed here)."""
        return self._envelopes.get(envelope_id)

    def admit(self, data: bytes) -> Transaction:
        """Check and hold the envelope ``data``; raises AdmissionError with a reason a submitter can act on."""
        if len(data) > MAX_ENVELOPE_BYTES:
            raise AdmissionError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}", reason="too_large")
        envelope_id = crypto.sha256(data)
        if envelope_id in self._pending or envelope_id in self._committed:
            raise AdmissionError(f"envelope {envelope_id.hex()[:16]} is already known", reason="duplicate")
        try:
            envelope, tx = self._open(data)
        except KeyUnavailable as exc:
            raise AdmissionError(str(exc), reason="no_key") from exc
        if tx.chain_id != self.chain_id:
            raise AdmissionError(f"transaction for chain {tx.chain_id!r}, not {self.chain_id!r}", reason="wrong_chain")
        key = self.members.get(tx.submitter)
        if key is None:
            raise AdmissionError(f"submitter {tx.submitter!r} is not a consortium member", reason="unknown_submitter")
        self._check_new(tx)
        tx.check_signature(key)
        self._hold(envelope, tx)
        self._checked.add(envelope.id)
        return tx

    def admit_own(self, tx: Transaction, envelope: Envelope) -> Transaction:
        """Hold a transaction this node just built, signed and sealed itself: no opening or
        signature check (it cannot fail them), only the duplicate and capacity checks."""
        self._check_new(tx)
        self._hold(envelope, tx)
        return tx

    def check_room(self, submitter: str) -> None:
        """Raise AdmissionError now if a transaction of ``submitter`` would not fit: a node checks
        before it builds and signs one, so a full pool costs a submitter nothing but the refusal."""
        if len(self._pending) >= self.capacity:
            raise AdmissionError(f"mempool full ({self.capacity} transactions pending)", reason="mempool_full")
        if self._held_by.of(submitter) >= self.member_quota:
            raise AdmissionError(f"{submitter} has {self.member_quota} transactions pending, its share of the "
                                 "mempool", reason="member_quota")

    def _check_new(self, tx: Transaction) -> None:
        if tx.id in self._by_tx or self._is_committed(tx.id):
            raise AdmissionError(f"transaction {tx.id.hex()[:16]} is already known", reason="duplicate")
        self.check_room(tx.submitter)

    def _hold(self, envelope: Envelope, tx: Transaction) -> None:
        self._pending[envelope.id] = tx
        self._envelopes[envelope.id] = envelope
        self._by_tx[tx.id] = envelope.id
        self._held_by.take(tx.submitter)

    def remove(self, envelope_ids: Iterable[bytes]) -> None:
        """Forget envelopes a committed block carried (and refuse them from now on without opening them)."""
        for envelope_id in envelope_ids:
            self._committed[envelope_id] = None
            if len(self._committed) > self.capacity:
                self._committed.popitem(last=False)
            tx = self._pending.pop(envelope_id, None)
            self._envelopes.pop(envelope_id, None)
            self._checked.discard(envelope_id)
            if tx is not None:
                self._by_tx.pop(tx.id, None)
                self._held_by.release(tx.submitter)

    def remove_committed(self, tx_ids: Iterable[bytes]) -> None:
        """Forget transactions committed under another envelope than the one held here."""
        self.remove([self._by_tx[tx_id] for tx_id in tx_ids if tx_id in self._by_tx])
