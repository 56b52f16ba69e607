"""Admission and holding of transactions until they are committed.

A transaction gets in only if it decodes strictly, is for this chain, was
submitted and signed by a genesis member, is new (neither pending nor
committed), and there is room. The checks run cheapest first, so a gossiped
duplicate costs a hash lookup, not a signature verification. The pool is
bounded: when full, the submitter is told "mempool full" instead of the pool
growing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from ..errors import AdmissionError, CodecError
from .transactions import MAX_TX_BYTES, Transaction


class Mempool:
    def __init__(
        self, chain_id: str, members: Mapping[str, bytes], *, capacity: int = 50_000,
        is_committed: Callable[[bytes], bool] = lambda _id: False,
    ) -> None:
        self.chain_id = chain_id
        self.members = dict(members)
        self.capacity = capacity
        self._is_committed = is_committed
        self._pending: OrderedDict[bytes, Transaction] = OrderedDict()
        self._checked: set[bytes] = set()  # ids admitted from the wire (decoded and verified here)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, tx_id: bytes) -> bool:
        return tx_id in self._pending

    def get(self, tx_id: bytes) -> Transaction | None:
        """The transaction with this id if it came in through :meth:`admit`: decoded strictly
        from exactly these bytes, and its signature checked (own transactions: None)."""
        return self._pending.get(tx_id) if tx_id in self._checked else None

    def admit(self, data: bytes) -> Transaction:
        """Check and hold ``data``; raises AdmissionError with a reason a submitter can act on."""
        if len(data) > MAX_TX_BYTES:
            raise AdmissionError(f"transaction of {len(data)} bytes exceeds {MAX_TX_BYTES}", reason="too_large")
        try:
            tx = Transaction.decode(data)
        except CodecError as exc:
            raise AdmissionError(f"malformed transaction: {exc}", reason="malformed") from exc
        if tx.chain_id != self.chain_id:
            raise AdmissionError(f"transaction for chain {tx.chain_id!r}, not {self.chain_id!r}", reason="wrong_chain")
        key = self.members.get(tx.submitter)
        if key is None:
            raise AdmissionError(f"submitter {tx.submitter!r} is not a consortium member", reason="unknown_submitter")
        if tx.id in self._pending or self._is_committed(tx.id):
            raise AdmissionError(f"transaction {tx.id.hex()[:16]} is already known", reason="duplicate")
        if len(self._pending) >= self.capacity:
            raise AdmissionError(f"mempool full ({self.capacity} transactions pending)", reason="mempool_full")
        tx.check_signature(key)
        self._pending[tx.id] = tx
        self._checked.add(tx.id)
        return tx

    def admit_own(self, tx: Transaction) -> Transaction:
        """Hold a transaction this node just built and signed itself: no decoding or signature
        check (it cannot fail them), only the duplicate and capacity checks."""
        if tx.id in self._pending or self._is_committed(tx.id):
            raise AdmissionError(f"transaction {tx.id.hex()[:16]} is already known", reason="duplicate")
        if len(self._pending) >= self.capacity:
            raise AdmissionError(f"mempool full ({self.capacity} transactions pending)", reason="mempool_full")
        self._pending[tx.id] = tx
        return tx

    def remove(self, tx_ids: Iterable[bytes]) -> None:
        for tx_id in tx_ids:
            self._pending.pop(tx_id, None)
            self._checked.discard(tx_id)
