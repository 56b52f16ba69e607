"""An owner's access decisions logged together: several pulls in one ``access.logs`` transaction.

Theory of operation
-------------------
Every decision an owner makes goes on chain before anything is served, and
each transaction costs every node a signature check, an envelope to open and
a round of admission. So decisions made close together share a transaction:

- an owner sends at most one batch every ``GAP`` seconds, unless it is full
  (``MAX_DECISIONS``): under load, decisions gather for up to ``GAP`` after
  the last batch and go out together, one transaction where there would have
  been several;
- a pull is *deciding* from the moment its request is found authentic until
  its decision joins a batch, or it leaves without one (rate-limited, busy).
  Once ``GAP`` has passed, a batch goes as soon as every deciding pull has
  joined it, or ``WINDOW`` after its first decision joined.

A decision made when no batch went out in the last ``GAP`` and no other pull is
being decided goes out at once: batching adds no wait at light load. Measured
on two cores with four members (``benchmarks/pull.py``): without the gap, pulls
seldom overlap and batches held 1.08 decisions; with 25 ms, about three, for
about 10% more verified pulls a second.

The ledger applies a transaction's decisions all together or none
(``ledger/access.py``), so one decision the chain refuses (its record erased
in the meantime, say) refuses the others with it; the owner then logs each of
those again on its own (:meth:`DecisionBatcher.log` without a deciding pull), once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ..ledger.transactions import MAX_DECISIONS, Transaction

#: The least time between two batches of one owner (unless the first was full).
GAP = 0.025
#: Past the gap, the longest a decision waits for the pulls being decided to join it.
WINDOW = 0.005


class _Slot:
    __slots__ = ("decision", "done", "tx", "error")

    def __init__(self, decision: dict[str, Any]) -> None:
        self.decision = decision
        self.done = trio.Event()
        self.tx: Transaction | None = None
        self.error: Exception | None = None


class Deciding:
    """One pull deciding (see :meth:`DecisionBatcher.deciding`)."""

    def __init__(self, batcher: DecisionBatcher) -> None:
        self._batcher = batcher
        self.open = True

    def close(self) -> None:
        """It stops deciding: its decision joined a batch, or it has none to log."""
        if self.open:
            self.open = False
            self._batcher._left()


class DecisionBatcher:
    """One per owner, on the event loop. ``submit(kind, body)`` signs, admits and gossips a
    transaction, or raises AdmissionError."""

    def __init__(self, submit: Callable[[str, dict[str, Any]], Transaction], *, batched: bool = True) -> None:
        self._submit = submit
        self._batched = batched  # False on a chain of ledger rules 1: one access.log a decision
        self._batch: list[_Slot] = []
        self._deciding = 0
        self._last = -GAP  # when the last batch went out

    @contextmanager
    def deciding(self) -> Iterator[Deciding]:
        """Around deciding one pull: the batch being gathered waits for it (up to ``WINDOW``)
        until it logs its decision or leaves without one."""
        self._deciding += 1
        pull = Deciding(self)
        try:
            yield pull
        finally:
            pull.close()

    def _left(self) -> None:
        self._deciding -= 1
        self._ready()

    async def log(self, decision: dict[str, Any], pull: Deciding | None) -> Transaction:
        """The transaction that carries ``decision``, once submitted (raises AdmissionError, or
        whatever else submitting it raised).

        ``pull`` joins the batch being gathered and stops deciding; with None, the decision
        goes out on its own at once (logged again after its batch was refused).
        """
        slot = _Slot(decision)
        if not self._batched or pull is None or not pull.open:
            if pull is not None:
                pull.close()
            self._send([slot])
        else:
            self._batch.append(slot)
            opened = len(self._batch) == 1
            pull.close()  # may send the batch: every deciding pull has joined
            if opened and not slot.done.is_set():
                try:
                    with trio.move_on_at(max(self._last + GAP, trio.current_time() + WINDOW)):
                        await slot.done.wait()
                finally:
                    if not slot.done.is_set():  # the window closed (or this pull was cancelled)
                        self._flush()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.tx is not None
        return slot.tx

    def _ready(self) -> None:
        if self._batch and (len(self._batch) >= MAX_DECISIONS or (
                self._deciding <= 0 and trio.current_time() >= self._last + GAP)):
            self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._last = trio.current_time()
            self._send(batch)

    def _send(self, slots: list[_Slot]) -> None:
        try:
            if self._batched:
                tx = self._submit("access.logs", {"epoch": 0, "decisions": [s.decision for s in slots]})
            else:
                tx = self._submit("access.log", {"epoch": 0, **slots[0].decision})
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it, whatever it is
            # Only an AdmissionError means nothing was admitted (the request may come again); any
            # other failure reaches each pull as it is.
            for s in slots:
                s.error = exc
        else:
            for s in slots:
                s.tx = tx
        finally:
            for s in slots:
                s.done.set()
