"""The driver: the one task that owns the consensus core, as the simulator's loop does.

The core is sans-I/O: it takes inputs with the time as an argument and returns actions. The driver
feeds it (consensus messages from peers, transactions from peers or local clients, peers that
connected, the timer) from two bounded inboxes, consensus messages first, so a burst of
transactions never delays a vote, and carries out the actions it returns: send through the peer
network, persist a block, hand committed blocks to the node, re-arm the timer, log. Peer
connections and API clients never touch the core.

When a commit ends the consensus epoch, the node hands the driver the next epoch's core
(:meth:`Driver.succeed`); messages of that epoch that arrived early are fed to it then.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..consensus.core import (
    Action,
    Broadcast,
    CommitBlocks,
    ConsensusCore,
    Log,
    PersistBlock,
    Send,
    SetTimer,
    epoch_of,
)
from ..consensus.messages import decode_message, encode_message
from ..consensus.types import Block, QuorumCert, TimeoutCert
from ..errors import CodecError, InvalidMessage, StoreError
from ..membership import Membership
from ..net.peers import Peer, PeerNetwork
from ..net.protocol import ConsensusFrame, encode_frame

CONSENSUS_INBOX = 10_000
#: Messages of a later consensus epoch kept for when this node gets there.
AHEAD_KEPT = 256
TX_INBOX = 100_000
#: Consensus messages handled per turn of the driver before it lets other tasks run.
MESSAGES_PER_TURN = 512
#: How long a commit waits for the messages sent before it to reach the kernel (a peer that
#: reads slowly holds it up no longer).
SEND_FIRST_WAIT = 0.002
#: Gossiped transactions admitted per turn of the driver, and the time a turn may take: each
#: costs opening and a signature check (~0.3 ms). A turn stays short, so the peer readers (which
#: take one TLS record per turn) and consensus messages never wait long behind a backlog of gossip.
TXS_PER_TURN = 64
TXS_TURN_SECONDS = 0.003
#: A peer whose connection closed counts as unreachable for consensus only after this long without
#: a new one: a link that drops and comes back (a redial takes about 0.1 s) costs no round, and a
#: member whose process stopped, which refuses the redial, is given up this much later.
LINK_GRACE = 0.5
#: After the node starts, peers not connected yet count as reachable this long (connecting takes
#: a moment, and a round given up for want of a link is lost to this node).
START_GRACE = 3.0
#: Core events an operator wants at info level (the rest are debug).
INFO_EVENTS = frozenset({"round.timeout", "round.skipped", "tc.formed", "vote.equivocation", "vote.refused",
                         "timeout.refused", "proposal.refused", "sync.started", "sync.finished"})


class Counts:
    """What the driver counts (the node exports them as metrics)."""

    def __init__(self) -> None:
        self.inbox_dropped = 0
        self.invalid_messages = 0
        self.timeouts = 0


class Driver:
    def __init__(self, core: ConsensusCore, membership: Membership, *, network: PeerNetwork,
                 persist: Callable[[Block], None], commit: Callable[[CommitBlocks], None],
                 admit: Callable[[Peer, bytes], bool], log: Any) -> None:
        """``admit(peer, data)``: whether a gossiped transaction enters the mempool (and so the core)."""
        self.core, self.membership = core, membership
        self._network, self._persist, self._commit, self._admit, self._log = network, persist, commit, admit, log
        self.counts = Counts()
        #: The core has loaded its certificates (the driver started it).
        self.started = False
        self._consensus_in: deque[tuple[Peer, bytes]] = deque()
        self._ahead: deque[tuple[Peer, bytes]] = deque(maxlen=AHEAD_KEPT)
        self._txs_in: deque[tuple[Peer | None, bytes]] = deque()
        self._connected: list[str] = []  # peers that (re)connected since the driver last looked
        self._links_changed = True  # a peer connected or left since the core last heard who is reachable
        self._down_since: dict[str, float] = {}  # peer -> since when it has had no connection (trio clock)
        self._links_due = float("inf")  # when a peer's grace runs out and the core must hear of it
        self._wake = trio.Event()
        self._deadline = float("inf")
        #: Commits, and the actions that came after them, held until the messages of the same
        #: input are sent (with the core that asked for each).
        self._later: list[tuple[ConsensusCore, Action]] = []

    # --- inputs (never block; called from peer readers and API handlers) --------------

    def consensus(self, peer: Peer, data: bytes) -> None:
        if len(self._consensus_in) >= CONSENSUS_INBOX:
            self.counts.inbox_dropped += 1  # overloaded: consensus re-sends what it needs
            return
        self._consensus_in.append((peer, data))
        self._wake.set()

    def transactions(self, peer: Peer, txs: tuple[bytes, ...]) -> None:
        room = max(TX_INBOX - len(self._txs_in), 0)
        if room < len(txs):
            self.counts.inbox_dropped += len(txs) - room
        self._txs_in.extend((peer, tx) for tx in txs[:room])
        self._wake.set()

    def own(self, data: bytes) -> None:
        """A transaction this node admitted already: handed to the core without checking it again."""
        self._txs_in.append((None, data))
        self._wake.set()

    def connected(self, name: str) -> None:
        self._connected.append(name)
        self.links_changed()

    def disconnected(self, name: str) -> None:
        """The connection to ``name`` closed: unreachable once LINK_GRACE passes without another."""
        self._down_since[name] = trio.current_time()
        self.links_changed()

    def links_changed(self) -> None:
        """A peer connected or its connection closed: tell the core whom it can reach."""
        self._links_changed = True
        self._wake.set()

    def _report_links(self) -> None:
        self._links_changed = False
        now = trio.current_time()
        connected = set(self._network.connected())
        down, due = [], float("inf")
        for i, member in enumerate(self.membership.members):
            if i == self.core.index or member.name in connected:
                self._down_since.pop(member.name, None)
                continue
            since = self._down_since.setdefault(member.name, now)
            if now - since >= LINK_GRACE:
                down.append(i)
            else:
                due = min(due, since + LINK_GRACE)
        self._links_due = due
        self.apply(self.core.set_unreachable(down, time.time()))

    def learn_certificates(self, high_qc: QuorumCert, high_tc: TimeoutCert | None) -> None:
        """The other validators said how far the chain got (after a restore)."""
        self.apply(self.core.learn_certificates(high_qc, high_tc, time.time()))

    def succeed(self, core: ConsensusCore, membership: Membership) -> None:
        """Run the next consensus epoch with ``core``; the early messages kept for it go first."""
        self.core, self.membership = core, membership
        self.apply(core.start(time.time()))
        self._links_changed = True  # the new epoch's validators, by their new indices
        ahead, self._ahead = self._ahead, deque(maxlen=AHEAD_KEPT)
        self._consensus_in.extendleft(reversed(ahead))
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self.apply(self.core.start(time.time()))
        self.started = True
        begun = trio.current_time()
        for member in self.membership.members:  # not connected yet: reachable for START_GRACE
            self._down_since.setdefault(member.name, begun + START_GRACE - LINK_GRACE)
        while True:
            await self._apply_later()  # held by an input from another task
            if (not self._consensus_in and not self._txs_in and not self._connected and not self._links_changed
                    and not self._later):
                with trio.move_on_at(min(self._deadline, self._links_due)):
                    await self._wake.wait()
                self._wake = trio.Event()
            # After each input the core's held actions are carried out before the next input
            # reaches it: a commit that ends the epoch replaces the core before anything else
            # is handed to the old one.
            if trio.current_time() >= self._deadline:
                self.apply(self.core.tick(time.time()))
                await self._apply_later()
            if trio.current_time() >= self._links_due:
                self._links_changed = True
            while self._connected:
                index = self.membership.index_of(self._connected.pop())
                if index is not None:
                    self.apply(self.core.on_peer_connected(index, time.time()))
                    await self._apply_later()
            # Consensus first, then one batch of transactions, then let other tasks run.
            for _ in range(min(len(self._consensus_in), MESSAGES_PER_TURN)):
                peer, data = self._consensus_in.popleft()
                self._message(peer, data)
                await self._apply_later()
            if self._links_changed:
                # After the messages already queued: a leader's proposal that came before its
                # connection closed is voted on, not given up.
                self._report_links()
                await self._apply_later()
            if self._txs_in:
                self._transactions()
                await self._apply_later()
            await trio.sleep(0)

    def _message(self, peer: Peer, data: bytes) -> None:
        sender = self.membership.index_of(peer.name)
        if sender is None:
            # A member this node does not count as a validator yet (it is behind on membership):
            # the validators it does count will make it catch up.
            self._log.debug("consensus.not_validator", peer=peer.name, epoch=self.core.vset.epoch)
            return
        try:
            message = decode_message(data)
            epoch = epoch_of(message)
            if epoch is not None and epoch > self.core.vset.epoch:
                # Kept to hand to the next core: a validator behind learns the epoch ended from
                # this very message, and its vote should still count once it has caught up.
                self._ahead.append((peer, data))
            actions = self.core.on_message(sender, message, time.time())
        except (CodecError, InvalidMessage) as exc:
            self._refuse(peer, exc.reason)
            self._log.warning("consensus.invalid_message", peer=peer.name, reason=exc.reason, error=str(exc))
            return
        except StoreError:
            raise  # the disk failed under us: stop rather than run on half-persisted state
        except Exception as exc:  # noqa: BLE001 - a message we did not foresee costs its sender the link
            self._refuse(peer, "internal_error")
            self._log.error("consensus.message_failed", peer=peer.name, error=repr(exc))
            return
        self.apply(actions)

    def _refuse(self, peer: Peer, reason: str) -> None:
        self.counts.invalid_messages += 1
        self._network.kick(peer, reason)

    def _transactions(self) -> None:
        accepted = []
        until = time.perf_counter() + TXS_TURN_SECONDS
        for _ in range(min(len(self._txs_in), TXS_PER_TURN)):
            peer, data = self._txs_in.popleft()
            if peer is None or self._admit(peer, data):
                accepted.append(data)
            if peer is not None and time.perf_counter() >= until:
                break
        if accepted:
            self.apply(self.core.submit(accepted, time.time()))

    def apply(self, actions: Iterable[Action]) -> None:
        """Carry out the core's actions: messages at once; a commit, and what follows it, once
        the messages are sent (the run loop does that next).

        Applying committed blocks to the ledger takes a while (SQLite, every transaction's
        rules), and the messages would otherwise leave only after it: a vote, or the proposal
        whose certificate committed the block, would wait for a commit the others do not
        need. The actions held keep their order, and everything after the first one held is
        held too.
        """
        core, membership = self.core, self.membership  # the core's own validators, even once its epoch ends
        for action in actions:
            if isinstance(action, Send):
                name = membership.members[action.to].name
                self._network.send(name, encode_frame(ConsensusFrame(encode_message(action.message))))
            elif isinstance(action, Broadcast):
                self._network.broadcast(encode_frame(ConsensusFrame(encode_message(action.message))))
            elif self._later or isinstance(action, CommitBlocks):
                self._later.append((core, action))
                self._wake.set()
            else:
                self._carry_out(core, action)

    async def _apply_later(self) -> None:
        """The actions held by ``apply``, once this input's messages are sent (or a moment passed)."""
        if not self._later:
            return
        await self._network.urgent_sent(SEND_FIRST_WAIT)
        later, self._later = self._later, []
        for core, action in later:
            self._carry_out(core, action)

    def _carry_out(self, core: ConsensusCore, action: Action) -> None:
        if self.core is not core:
            # An earlier action ended the epoch. The old core's messages still went out (a
            # proposal carrying the certificate that committed the epoch's last block is how
            # the others learn of it at once); its timers and the rest are void.
            return
        if isinstance(action, SetTimer):
            delay = action.at - time.time()
            self._deadline = trio.current_time() + max(delay, 0.0) if action.at != float("inf") else float("inf")
        elif isinstance(action, PersistBlock):
            self._persist(action.block)
        elif isinstance(action, CommitBlocks):
            self._commit(action)
        elif isinstance(action, Log):
            self._log_core(action)

    def _log_core(self, action: Log) -> None:
        if action.event in ("round.timeout", "round.skipped"):
            self.counts.timeouts += 1
        if action.event == "proposal.invalid":
            self._log.error(action.event, **action.fields)
        elif action.event in INFO_EVENTS:
            self._log.info(action.event, **action.fields)
        else:
            self._log.debug(action.event, **action.fields)
