"""What follows a commit, besides the ledger: the node's subscribers to committed blocks.

The node applies each committed block to its stores first; then it hands the block, with the
transactions the ledger found valid, to each subscriber in the order they subscribed: key
upkeep, whois answers, event feeds, callers waiting for a transaction, block notifications.
A subscriber that fails is logged under its own event and never stops the chain, nor the
subscribers after it; only a failing disk (StoreError) stops the node, as everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..consensus.types import Block
from ..errors import AdmissionError, StoreError
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction
from ..sharing.events import Subscription, events_of

#: ``subscriber(block, txs)``: ``txs`` are the block's valid transactions, in order.
Subscriber = Callable[[Block, Sequence[Transaction]], None]

#: Block notifications queued for one ``blocks.subscribe`` client before it misses some.
BLOCK_QUEUE = 256
#: Events queued for one ``events.subscribe`` client before it misses some (counted): more than
#: one block can give (its 4 MiB hold at most about 21,000 anchors or access decisions).
EVENT_QUEUE = 32_768
#: Events queued for all subscribers together: past this, the subscriber furthest behind is
#: closed (its client sees the feed end, and can catch up with ``audit trail``).
EVENTS_QUEUED = 131_072


class Commits:
    """The subscribers to committed blocks, each with the log event of its failures."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._subscribers: list[tuple[str, Subscriber]] = []

    def subscribe(self, failure_event: str, subscriber: Subscriber) -> None:
        self._subscribers.append((failure_event, subscriber))

    def subscribe_each(self, failure_event: str, wanted: Callable[[Transaction], bool],
                       act: Callable[[Transaction], None]) -> None:
        """``act(tx)`` for each committed transaction ``wanted(tx)`` picks, each failing alone."""
        def each(block: Block, txs: Sequence[Transaction]) -> None:
            for tx in txs:
                if not wanted(tx):
                    continue
                try:
                    act(tx)
                except StoreError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failing must not stop the others
                    self._log.error(failure_event, height=block.height, request=tx.id.hex()[:16], error=repr(exc))

        self.subscribe(failure_event, each)

    def committed(self, block: Block, txs: Sequence[Transaction]) -> None:
        for failure_event, subscriber in self._subscribers:
            try:
                subscriber(block, txs)
            except StoreError:
                raise  # the disk failed under us: stop rather than run on half-persisted state
            except Exception as exc:  # noqa: BLE001 - a subscriber must never stop the chain
                self._log.error(failure_event, height=block.height, error=repr(exc))


@dataclass
class _Waiter:
    """Everyone waiting for one transaction: woken together, forgotten when the last one leaves."""

    event: trio.Event = field(default_factory=trio.Event)
    height: int | None = None
    waiting: int = 0


class TxWaiters:
    """Callers waiting for a transaction to commit (``wait``), or to be in a committed block
    whatever the ledger made of it (``wait_applied``)."""

    def __init__(self, height_of: Callable[[bytes], int | None], status_of: Callable[[bytes], str | None],
                 block_txs: Callable[[int], list[tuple[bytes, str]]]) -> None:
        self._height_of = height_of  # the committed height of a transaction, from the ledger
        self._status_of = status_of  # its status (``ok`` or ``invalid:...``) once in a committed block
        self._block_txs = block_txs  # (id, status) of every entry of a committed block
        self._committed: dict[bytes, _Waiter] = {}
        self._applied: dict[bytes, _Waiter] = {}

    async def wait(self, tx_id: bytes, timeout: float) -> int | None:
        """The height ``tx_id`` was committed at, or None if not within ``timeout`` seconds."""
        height = self._height_of(tx_id)
        if height is not None:
            return height
        waiter = await _wait(self._committed, tx_id, timeout)
        return waiter.height if waiter.height is not None else self._height_of(tx_id)

    async def wait_applied(self, tx_id: bytes, timeout: float) -> str | None:
        """``ok`` or ``invalid:<reason>`` once ``tx_id`` is in a committed block; None if not
        within ``timeout`` seconds. Unlike :meth:`wait`, a transaction the ledger refused ends the
        wait as soon as its block commits."""
        status = self._status_of(tx_id)
        if status is not None:
            return status
        await _wait(self._applied, tx_id, timeout)
        return self._status_of(tx_id)

    def committed(self, block: Block, txs: Sequence[Transaction]) -> None:
        for tx in txs:
            waiter = self._committed.get(tx.id)
            if waiter is not None:
                waiter.height = block.height
                waiter.event.set()
        if self._applied:
            for tx_id, _ in self._block_txs(block.height):
                waiter = self._applied.get(tx_id)
                if waiter is not None:
                    waiter.event.set()


async def _wait(waiters: dict[bytes, _Waiter], tx_id: bytes, timeout: float) -> _Waiter:
    """Wait with the others waiting for ``tx_id`` until woken or ``timeout``: one that gives up
    first does not take the others' wake-up with it."""
    waiter = waiters.setdefault(tx_id, _Waiter())
    waiter.waiting += 1
    try:
        with trio.move_on_after(timeout):
            await waiter.event.wait()
    finally:
        waiter.waiting -= 1
        if not waiter.waiting and waiters.get(tx_id) is waiter:
            del waiters[tx_id]
    return waiter


class BlockFeed:
    """``blocks.subscribe``: one note per committed block to each subscriber."""

    def __init__(self) -> None:
        self._channels: list[trio.MemorySendChannel[dict[str, Any]]] = []

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](BLOCK_QUEUE)
        self._channels.append(send)
        return receive

    def committed(self, block: Block, txs: Sequence[Transaction]) -> None:
        note = {"height": block.height, "id": block.id.hex(), "round": block.round, "txs": len(block.payload)}
        for channel in list(self._channels):
            try:
                channel.send_nowait(note)
            except trio.WouldBlock:
                pass  # a slow subscriber misses notifications; it can fetch blocks by height
            except trio.BrokenResourceError:
                self._channels.remove(channel)


class EventFeed:
    """``events.subscribe`` (``ehrnode watch``): the events of the chain each subscription wants."""

    def __init__(self, name: str, state: LedgerState, log: Any, *, limit: int) -> None:
        self.name = name
        self.state = state
        self.log = log
        self.limit = limit  # subscriptions open at once
        self.dropped = 0  # events a subscriber did not read in time
        self._subscriptions: list[tuple[Subscription, trio.MemorySendChannel[dict[str, Any]]]] = []

    def subscribe(self, subscription: Subscription) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """A channel of the events ``subscription`` wants (raises AdmissionError past the limit)."""
        self._prune()
        if len(self._subscriptions) >= self.limit:
            raise AdmissionError(f"{self.limit} event subscriptions are open on this node",
                                 reason="too_many_subscriptions")
        send, receive = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE)
        self._subscriptions.append((subscription, send))
        return receive

    @property
    def open(self) -> int:
        """Subscriptions whose client is still reading (``ehrnode_event_subscriptions``)."""
        return sum(1 for _, c in self._subscriptions if c.statistics().open_receive_channels)

    def _bound(self, height: int) -> None:
        """Close the subscriptions furthest behind while all of them hold more than ``EVENTS_QUEUED``."""
        queued = sorted(((c.statistics().current_buffer_used, i) for i, (_, c) in enumerate(self._subscriptions)),
                        reverse=True)
        total = sum(n for n, _ in queued)
        closed = []
        for n, i in queued:
            if total <= EVENTS_QUEUED:
                break
            closed.append(i)
            total -= n
        for i in sorted(closed, reverse=True):
            _, channel = self._subscriptions.pop(i)
            channel.close()
            self.log.warning("events.subscriber_closed", height=height, reason="too_far_behind")

    def _prune(self) -> None:
        # A client that went away closed its end: drop its subscription even if nothing matched.
        self._subscriptions = [(s, c) for s, c in self._subscriptions if c.statistics().open_receive_channels]

    def committed(self, block: Block, txs: Sequence[Transaction]) -> None:
        if not self._subscriptions:
            return
        self._prune()
        self._bound(block.height)
        dropped = 0
        for event in (e for tx in txs for e in events_of(self.state, tx, block.height)):
            # Once per event, not per subscriber: every EMPI that stands for this patient now.
            aliases = frozenset(self.state.empi.aliases(event.empi)) if event.empi else frozenset()
            for subscription, channel in list(self._subscriptions):
                if not subscription.wants(self.name, event, aliases):
                    continue
                try:
                    channel.send_nowait(event.body)
                except trio.WouldBlock:
                    dropped += 1  # a subscriber that does not read loses events, counted
                except trio.BrokenResourceError:
                    self._subscriptions.remove((subscription, channel))
        if dropped:
            self.dropped += dropped
            self.log.warning("events.dropped", dropped=dropped, height=block.height)  # one line a block
