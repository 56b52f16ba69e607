"""The consensus core: 2-chain HotStuff (Jolteon / DiemBFT v4) as a sans-I/O state machine.

Theory of operation
-------------------
Inputs are method calls: :meth:`ConsensusCore.start`, :meth:`on_message`
(a proposal, vote, timeout, sync request or sync response from a validator),
:meth:`submit` (new transactions) and :meth:`tick` (the time has come). Time is
always an argument. Every call returns a list of actions for the driver to
carry out: :class:`Send`, :class:`Broadcast`, :class:`SetTimer`,
:class:`PersistBlock`, :class:`CommitBlocks`, :class:`Log`. The core does no
I/O of its own; the only thing it touches outside itself is the safety store,
through the safety rules, which must make signed data durable before it is
returned (and so before any action that carries it exists).

The round advances on a certificate for the previous round: a QC (2f+1 votes
for a block) or a TC (2f+1 timeouts). The leader of round r proposes a block
extending its highest QC, with the TC if it entered r by one. Validators vote
for it (if the safety rules agree) and send the vote to the leader of r+1,
who forms the QC and proposes in turn. A QC for a block whose parent is exactly
one round older commits that parent and all its ancestors (the 2-chain rule).
When a round makes no progress, validators broadcast timeouts (re-sent until
the round changes) and 2f+1 of them form a TC that moves everyone on.

A validator that sees a certificate or proposal whose ancestors it lacks asks
a peer for them (:class:`SyncRequest`, newest first) and links them in once
they connect to its tree.

Invalid input raises :class:`~ehrnode.errors.InvalidMessage` before any state
changes; the safety rules are only consulted with verified data.

A core runs one epoch (one validator set). The application decides which
committed block ends an epoch; the driver then replaces the core by its
:meth:`~ConsensusCore.successor`, rooted at that block. A message of a later
epoch tells a core it is behind: it fetches committed blocks (which end at the
epoch's last block) instead of refusing the sender; one of an earlier epoch is
answered with an :class:`EpochHint`, which tells the sender just that. A node
that is not a validator of its epoch runs the core with no index: it follows
and syncs, and signs nothing. See ``docs/consensus.md``, "Epochs".
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, TypeVar

from .. import crypto
from ..errors import InvalidMessage, SafetyViolation
from .block_tree import BlockTree
from .messages import (
    MAX_SYNC_BLOCKS,
    EpochHint,
    Message,
    Proposal,
    RangeRequest,
    RangeResponse,
    SyncRequest,
    SyncResponse,
    TimeoutMsg,
    VoteMsg,
)
from .pacemaker import Pacemaker, PacemakerConfig
from .safety import SafetyRules, SafetyStore
from .types import (
    MAX_PAYLOAD_BYTES,
    Block,
    EpochEnd,
    QuorumCert,
    Recovery,
    Timeout,
    TimeoutCert,
    ValidatorSet,
    Vote,
    form_qc,
    form_tc,
)

#: Further behind than this many blocks, a validator syncs committed ranges forwards.
RANGE_SYNC_GAP = 16
#: A range answer stops adding blocks past this much payload (it must fit in one frame).
MAX_RANGE_PAYLOAD = 4 * 1024 * 1024

# --- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: int
    message: Message


@dataclass(frozen=True)
class Broadcast:
    """Send to every other validator."""

    message: Message


@dataclass(frozen=True)
class SetTimer:
    """Call :meth:`ConsensusCore.tick` at (or soon after) ``at``."""

    at: float


@dataclass(frozen=True)
class PersistBlock:
    """A verified block joined the tree; store it so a restart does not need to fetch it again."""

    block: Block


@dataclass(frozen=True)
class CommitBlocks:
    """``blocks`` (oldest first, consecutive heights) are final; ``proof`` is the QC that committed them."""

    blocks: tuple[Block, ...]
    proof: QuorumCert


@dataclass(frozen=True)
class Log:
    """Something an operator may want to see; the driver decides the level and rate."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = Send | Broadcast | SetTimer | PersistBlock | CommitBlocks | Log


@dataclass(frozen=True)
class CoreConfig:
    pacemaker: PacemakerConfig = field(default_factory=PacemakerConfig)
    max_block_txs: int = 500
    max_pending_txs: int = 100_000
    #: A leader with nothing to commit or announce (no pending transactions, none in the block it
    #: extends or that block's parent) waits this long after its parent's timestamp before
    #: proposing an empty block.
    empty_block_delay: float = 0.0
    #: Under load (the parent block carries transactions and some are still uncommitted), a
    #: leader without a full block waits until this long after its parent's timestamp (never
    #: longer than this from now) before proposing, so per-block work (signatures, votes,
    #: fsyncs) is shared by more transactions. The first block after a quiet spell goes at once;
    #: a lone transaction commits up to this much later than it would otherwise.
    min_block_interval: float = 0.0
    #: How far a block's time may be from this validator's clock, ahead or behind, for it to vote
    #: for the block (seconds); members' clocks are kept by NTP well within it.
    max_clock_drift: float = 30.0
    #: ``min_block_interval`` applies only while at least this many transactions wait: a light
    #: stream is proposed as it comes (each transaction commits as fast as the network allows),
    #: a backlog is carried in fewer, fuller blocks.
    pace_backlog: int = 1
    #: Blocks fetched by sync but not yet linked to the tree (bounds memory while far behind).
    max_orphans: int = 20_000
    sync_retry: float = 1.0
    #: Proposals kept per round above the root (an equivocating leader cannot flood the tree).
    max_proposals_per_round: int = 2
    #: How a leader orders its block's payload, given the id of the certified block it extends
    #: (randomness no one chose for this block); None keeps arrival order. Payloads stay opaque
    #: to the core: this is the application's choice, and voters do not check it.
    order_payload: Callable[[list[bytes], bytes], list[bytes]] | None = None
    #: Leader reputation: the leader of a round entered by a certificate for the block before it
    #: is chosen, in turn, among the validators that proposed or signed a certificate in the last
    #: ``leader_window`` blocks of that chain (None: twice the validators, 0: plain round robin).
    #: Every validator of a consortium must use the same value.
    leader_window: int | None = None


_Input = TypeVar("_Input", bound=Callable[..., list[Action]])


def _input(method: _Input) -> _Input:
    """One input to the core: the safety data it changes is written once, before its messages go."""
    @functools.wraps(method)
    def handle(self: ConsensusCore, *args: Any, **kwargs: Any) -> list[Action]:
        with self.safety.deferred():
            return method(self, *args, **kwargs)
    return handle  # type: ignore[return-value]


class ConsensusCore:
    def __init__(
        self,
        vset: ValidatorSet,
        index: int | None,
        identity: crypto.Identity,
        safety_store: SafetyStore,
        *,
        config: CoreConfig | None = None,
        recovery: Recovery | None = None,
        committed_lookup: Callable[[bytes], Block | None] | None = None,
        committed_at: Callable[[int], Block | None] | None = None,
        epoch_end: Callable[[int], EpochEnd | None] | None = None,
        unsafe_skip_vote_rule: bool = False,
    ) -> None:
        self.vset = vset
        self.index = index
        self._identity = identity
        self._safety_store = safety_store
        self._epoch_end = epoch_end or (lambda _epoch: None)
        self._unsafe_skip_vote_rule = unsafe_skip_vote_rule
        self.config = config or CoreConfig()
        self.safety = SafetyRules(vset, index, identity, safety_store, unsafe_skip_vote_rule=unsafe_skip_vote_rule)
        self.pacemaker = Pacemaker(self.config.pacemaker)
        self._committed_lookup = committed_lookup or (lambda _id: None)
        self._committed_at = committed_at or (lambda _height: None)

        root = recovery.root if recovery else vset.root
        if root.height < vset.root.height:
            raise ValueError(f"recovered root at height {root.height}, below epoch {vset.epoch}'s start")
        self.tree = BlockTree(root)
        self.high_qc: QuorumCert = vset.root_qc
        self.high_tc: TimeoutCert | None = None
        if recovery:
            # Blocks and certificates of earlier epochs are not this core's (an epoch's last blocks
            # may have been stored after the block that ended it).
            pending = sorted((b for b in recovery.blocks if b.epoch == vset.epoch), key=lambda b: b.height)
            for block in pending:
                self.tree.insert(block)
                if block.qc is not None and block.qc.round > self.high_qc.round:
                    self.high_qc = block.qc
            if recovery.high_qc is not None and recovery.high_qc.data.epoch != vset.epoch:
                recovery = Recovery(recovery.root, recovery.blocks, None)
            if recovery.high_qc is not None and recovery.high_qc.round > self.high_qc.round:
                self.high_qc = recovery.high_qc
        self._pending_commit: QuorumCert | None = None
        self._catching_up = False
        # The certificate that committed the root, if known (sent with range answers that reach it).
        self._root_proof: QuorumCert | None = None
        if recovery and recovery.high_qc is not None and recovery.high_qc.data.parent_id == self.tree.root.id:
            self._root_proof = recovery.high_qc
        self._range_wanted: tuple[int, float, int] | None = None  # (from height, retry at, attempts)

        self._votes: dict[int, dict[bytes, dict[int, Vote]]] = {}
        self._vote_digests: dict[tuple[int, int], bytes] = {}
        self._qc_formed: set[bytes] = set()
        self._timeouts: dict[int, dict[int, Timeout]] = {}
        self._proposed_round = 0
        self._proposal_counts: dict[int, int] = {}
        self._waiting_proposals: dict[bytes, tuple[int, Proposal]] = {}
        self._orphans: dict[bytes, Block] = {}
        self._sync_wanted: dict[bytes, float] = {}
        self._sync_attempts: dict[bytes, int] = {}
        self._sync_peer = 0
        self._pending_txs: OrderedDict[bytes, bytes] = OrderedDict()
        self._propose_at = float("inf")
        # A proposal held back by min_block_interval: (round, when it goes), fixed once per round.
        self._paced: tuple[int, float] = (0, 0.0)
        self._last_proposal: Proposal | None = None
        window = self.config.leader_window
        self._leader_window = 2 * vset.n if window is None else window
        self._leaders: OrderedDict[bytes, int] = OrderedDict()  # block id -> leader of the round after it
        # What leader reputation reads of recent blocks, kept as they leave the tree on commit, so
        # a window is not read back from the block store: id -> (parent, epoch, round, who took part).
        self._recent: OrderedDict[bytes, tuple[bytes, int, int, frozenset[int]]] = OrderedDict()
        # Validators this node has no link to now (set_unreachable): a round waiting on one of them
        # is given up at once rather than at its timeout.
        self._unreachable: frozenset[int] = frozenset()

    # --- introspection ----------------------------------------------------------------

    @property
    def round(self) -> int:
        return self.pacemaker.round

    @property
    def root(self) -> Block:
        return self.tree.root

    @property
    def committed_height(self) -> int:
        return self.tree.root.height

    @property
    def sync_gap(self) -> int:
        """Blocks between the committed root and a known commit not yet reached (0 when none)."""
        if self._pending_commit is None:
            return 0
        return max(0, self._pending_commit.height - 1 - self.root.height)

    @property
    def pending_tx_count(self) -> int:
        return len(self._pending_txs)

    def get_block(self, block_id: bytes) -> Block | None:
        return self.tree.get(block_id) or self._committed_lookup(block_id)

    def successor(self, vset: ValidatorSet, index: int | None,
                  identity: crypto.Identity | None = None) -> ConsensusCore:
        """The core of the next epoch, rooted at ``vset.start`` (a block this core committed): same
        stores and configuration, and the same identity unless ``identity`` replaces it; the
        transactions still waiting carry over. Call :meth:`start` on it; this core must not be
        used again."""
        assert vset.epoch == self.vset.epoch + 1 and vset.start is not None
        core = ConsensusCore(
            vset, index, identity or self._identity, self._safety_store, config=self.config,
            committed_lookup=self._committed_lookup, committed_at=self._committed_at, epoch_end=self._epoch_end,
            unsafe_skip_vote_rule=self._unsafe_skip_vote_rule,
        )
        core._pending_txs = self._pending_txs
        return core

    # --- leaders --------------------------------------------------------------------------

    def leader_after(self, block: Block) -> int:
        """The leader of round ``block.round + 1`` when that round is entered by a certificate for
        ``block`` (a proposal extending it directly): leader reputation.

        The candidates are the validators that authored one of the last ``leader_window`` blocks
        of the chain ending at ``block``, or signed a certificate in one; they lead in turn by
        round. A validator that has crashed, or stopped voting and proposing, drops out within
        a window instead of costing a timeout every n rounds. The choice depends on ``block``
        and its ancestors only, so every validator that has the block makes it alike; while
        the epoch's chain is shorter than the window, and with ``leader_window = 0``, the
        leader is round robin. See docs/consensus.md, "Leader reputation".
        """
        leader = self._leaders.get(block.id)
        if leader is None:
            leader = self._reputation(block)
            self._leaders[block.id] = leader
            if len(self._leaders) > 4 * self.vset.n + 64:
                self._leaders.popitem(last=False)
        return leader

    def _reputation(self, block: Block) -> int:
        # An epoch's first round follows its root certificate (round 0), whatever the round of the
        # previous epoch's last block.
        round_ = block.round + 1 if block.epoch == self.vset.epoch else 1
        active: set[int] = set()
        current: tuple[bytes, int, int, frozenset[int]] | None = self._took_part(block)
        for _ in range(self._leader_window):
            if current is None or current[1] != self.vset.epoch or current[2] == 0:
                return self.vset.leader(round_)  # not enough of this epoch's history yet
            active |= current[3]
            current = self._recent.get(current[0]) or self._took_part(self.get_block(current[0]))
        if not active:
            return self.vset.leader(round_)  # leader_window = 0: round robin
        candidates = sorted(active)
        return candidates[round_ % len(candidates)]

    def _took_part(self, block: Block | None) -> tuple[bytes, int, int, frozenset[int]] | None:
        """A block's parent, epoch and round, and the validators that took part in it: its author
        and the signers of the certificate it carries."""
        if block is None:
            return None
        entry = self._recent.get(block.id)
        if entry is None:
            signers = () if block.qc is None else (signer for signer, _ in block.qc.signatures)
            entry = (block.parent, block.epoch, block.round, frozenset((block.author, *signers)))
            self._recent[block.id] = entry
            if len(self._recent) > 4 * self._leader_window + 64:
                self._recent.popitem(last=False)
        return entry

    def leader_of(self, block: Block) -> int | None:
        """Who may propose ``block``: by reputation after its parent if it extends a certificate for
        the round just before, else (a round entered by a timeout certificate) round robin.
        None when this node lacks the parent."""
        if block.qc is not None and block.qc.round + 1 == block.round:
            parent = self.get_block(block.parent)
            return None if parent is None else self.leader_after(parent)
        return self.vset.leader(block.round)

    def _leader(self, round_: int) -> int | None:
        """The leader of ``round_`` as this validator's certificates say (None: it cannot tell yet)."""
        if self.high_qc.round + 1 == round_:
            parent = self.get_block(self.high_qc.block_id)
            return None if parent is None else self.leader_after(parent)
        if self.high_tc is not None and self.high_tc.round + 1 == round_:
            return self.vset.leader(round_)
        return None

    # --- inputs -----------------------------------------------------------------------

    @_input
    def start(self, now: float) -> list[Action]:
        actions: list[Action] = []
        saved = self.safety.data
        if saved.high_qc is not None and saved.high_qc.round > self.high_qc.round:
            self.high_qc = saved.high_qc
        if saved.high_tc is not None and (self.high_tc is None or saved.high_tc.round > self.high_tc.round):
            self.high_tc = saved.high_tc
        round_ = self.high_qc.round + 1
        if self.high_tc is not None:
            round_ = max(round_, self.high_tc.round + 1)
        # Never re-enter a round we already voted or timed out in, after a restart.
        round_ = max(round_, self.safety.data.last_voted_round)
        self._proposed_round = saved.last_proposed_round
        self._enter_round(round_, now, actions)
        self._end(now, actions)
        return actions

    @_input
    def submit(self, txs: Iterable[bytes], now: float) -> list[Action]:
        """Queue new transactions (already admitted by the mempool) for proposal."""
        for tx in txs:
            if len(self._pending_txs) >= self.config.max_pending_txs:
                break
            self._pending_txs.setdefault(crypto.sha256(tx), tx)
        actions: list[Action] = []
        # Held back by min_block_interval this round: new transactions wait for that moment
        # (unless they fill a block); an empty-block delay never holds them back.
        waiting = (self._paced[0] == self.round and now < self._paced[1]
                   and len(self._pending_txs) < self.config.max_block_txs)
        if self._is_leader(self.round) and self._proposed_round < self.round and not waiting:
            self._maybe_propose(now, actions)
        self._end(now, actions)
        return actions

    @_input
    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.pacemaker.expired(now):
            actions.append(Log("round.timeout", {"round": self.round}))
            self._local_timeout(now, actions)
        elif self.pacemaker.resend_due(now):
            self._local_timeout(now, actions)
        if now >= self._propose_at:
            self._maybe_propose(now, actions)
        for block_id, deadline in list(self._sync_wanted.items()):
            if now >= deadline:
                self._request_sync(block_id, now, actions, retry=True)
        if self._range_wanted is not None and now >= self._range_wanted[1]:
            self._request_range(now, actions, retry=True)
        self._end(now, actions)
        return actions

    @_input
    def learn_certificates(self, qc: QuorumCert, tc: TimeoutCert | None, now: float) -> list[Action]:
        """Verified certificates learned outside a message (the survey after a restore)."""
        actions: list[Action] = []
        self._process_qc(qc, now, actions)
        if tc is not None:
            self._process_tc(tc, now, actions)
        self._end(now, actions)
        return actions

    @_input
    def set_unreachable(self, validators: Iterable[int], now: float) -> list[Action]:
        """The validators this node has no link to now (its connections to them are down).

        A round that cannot end well for want of one of them is given up at once, as its timeout
        would give it up later: the round's leader is unreachable and its proposal has not come,
        or this node voted and the vote's aggregator (the next round's leader) is unreachable.
        Safety never rests on when a validator times out; a link wrongly reported down costs
        this node its part in one round, which the others finish without it if they can.
        """
        self._unreachable = frozenset(validators) - {self.index}
        actions: list[Action] = []
        self._end(now, actions)
        return actions

    @_input
    def on_peer_connected(self, peer: int, now: float) -> list[Action]:
        """A validator (re)connected: send it what it may have missed of the current round.

        Our proposal, our vote if it leads the next round, and our timeout, all for the current
        round only: enough to let the round finish now instead of waiting for a timeout after a
        restart or a network cut.
        """
        self.vset.key(peer)
        actions: list[Action] = []
        data = self.safety.data
        if self._last_proposal is not None and self._last_proposal.block.round == self.round:
            actions.append(Send(peer, self._last_proposal))
        vote = data.last_vote
        voted = self.tree.get(vote.block_id) if vote is not None and vote.round == self.round else None
        if vote is not None and voted is not None and self.leader_after(voted) == peer:
            actions.append(Send(peer, VoteMsg(vote)))
        timeout = data.last_timeout
        if timeout is not None and timeout.round == self.round:
            actions.append(Send(peer, TimeoutMsg(timeout, self.high_tc)))
        self._end(now, actions)
        return actions

    @_input
    def on_message(self, sender: int, message: Message, now: float) -> list[Action]:
        """Handle one message from validator ``sender``; raises InvalidMessage if it must be refused."""
        self.vset.key(sender)
        actions: list[Action] = []
        epoch = epoch_of(message)
        if epoch is not None and epoch != self.vset.epoch:
            if epoch > self.vset.epoch:
                # The others moved on: this epoch ended at a block we have not committed. Fetch
                # the committed blocks; the last of this epoch comes with its proof.
                if self._range_wanted is None:
                    actions.append(Log("epoch.behind", {"epoch": self.vset.epoch, "seen": epoch, "from": sender}))
                # Ask the sender first: it is in a later epoch, so it committed the end of ours (a
                # peer picked in turn may be as far behind as we are, and costs a retry each).
                self._request_range(now, actions, peer=sender)
            elif not isinstance(message, EpochHint):
                # The sender is still in an epoch this validator has left: tell it, so it fetches
                # the end of its epoch (perhaps from us) rather than wait for messages of the new
                # one, which may never come (the validators it waits for may have left).
                actions.append(Send(sender, EpochHint(self.vset.epoch)))
            self._end(now, actions)
            return actions
        if isinstance(message, Proposal):
            self._on_proposal(sender, message, now, actions)
        elif isinstance(message, VoteMsg):
            self._on_vote(message.vote, now, actions)
        elif isinstance(message, TimeoutMsg):
            self._on_timeout(message, now, actions)
        elif isinstance(message, SyncRequest):
            actions.append(Send(sender, self._answer_sync(message)))
        elif isinstance(message, SyncResponse):
            self._on_sync_response(sender, message, now, actions)
        elif isinstance(message, RangeRequest):
            actions.append(Send(sender, self._answer_range(message)))
        elif isinstance(message, RangeResponse):
            self._on_range_response(sender, message, now, actions)
        elif isinstance(message, EpochHint):
            pass  # the sender is in this epoch too: nothing to catch up on
        else:
            raise InvalidMessage(f"not a consensus message: {type(message).__name__}", reason="unknown_type")
        self._end(now, actions)
        return actions

    # --- proposals and votes ----------------------------------------------------------

    def _on_proposal(self, sender: int, proposal: Proposal, now: float, actions: list[Action]) -> None:
        block = proposal.block
        block.verify(self.vset)
        if proposal.tc is not None:
            if proposal.tc.round + 1 != block.round:
                raise InvalidMessage("proposal: timeout certificate is not for the previous round",
                                     reason="tc_mismatch")
            proposal.tc.verify(self.vset)
        leader = self.leader_of(block)
        if leader is not None and block.author != leader:
            raise InvalidMessage(f"block: validator {block.author} is not the leader of round {block.round}",
                                 reason="not_leader")
        entered_by = proposal.tc.round if proposal.tc is not None else block.qc.round  # type: ignore[union-attr]
        if block.round != entered_by + 1:
            # An honest leader proposes in the round right after the certificate it carries; any
            # other round is unjustified, however far ahead (or behind) it is.
            raise InvalidMessage(
                f"proposal: round {block.round} does not follow its certificate's round {entered_by}",
                reason="unjustified_round",
            )
        # Certificates first: they may move us into the block's round.
        if proposal.tc is not None:
            self._process_tc(proposal.tc, now, actions)
        self._process_qc(block.qc, now, actions)  # type: ignore[arg-type]
        if block.id in self.tree:
            self._vote_for(block, proposal.tc, now, actions)
            return
        if block.height <= self.root.height:
            actions.append(Log("proposal.stale", {"round": block.round, "height": block.height}))
            return
        if self._proposal_counts.get(block.round, 0) >= self.config.max_proposals_per_round:
            actions.append(Log("proposal.dropped", {"round": block.round, "reason": "too_many_in_round"}))
            return
        if block.parent not in self.tree:
            if len(self._waiting_proposals) < 2 * self.config.max_proposals_per_round:
                self._waiting_proposals[block.id] = (sender, proposal)
            self._request_sync(block.parent, now, actions, peer=sender)
            return
        self._proposal_counts[block.round] = self._proposal_counts.get(block.round, 0) + 1
        self._insert(block, actions)
        self._vote_for(block, proposal.tc, now, actions)
        # The block may be the parent a parked proposal, or a pending commit, was waiting for.
        self._try_commit(now, actions)
        self._retry_waiting(now, actions)

    def _insert(self, block: Block, actions: list[Action]) -> None:
        if self.tree.insert(block):
            actions.append(PersistBlock(block))
            self._sync_wanted.pop(block.id, None)
            self._sync_attempts.pop(block.id, None)
            self._orphans.pop(block.id, None)

    def _vote_for(self, block: Block, tc: TimeoutCert | None, now: float, actions: list[Action]) -> None:
        if block.round != self.round or self.index is None:
            return
        # Block times are what ledger rules count by (a day's quota, a phase's window): an honest
        # validator does not vote for a time before the parent's or past its own clock by more
        # than the drift it allows, so a Byzantine leader cannot move the chain's time at will.
        parent = self.tree.get(block.parent)
        if parent is not None and block.timestamp < parent.timestamp:
            actions.append(Log("vote.refused", {"round": block.round, "reason": "time_before_parent"}))
            return
        if block.timestamp > now * 1000 + self.config.max_clock_drift * 1000:
            actions.append(Log("vote.refused", {"round": block.round, "reason": "time_in_future"}))
            return
        if block.timestamp < now * 1000 - self.config.max_clock_drift * 1000:
            # Not backdated either: a leader stamping its parent's time after a quiet spell would
            # make a window counted in block time look already passed.
            actions.append(Log("vote.refused", {"round": block.round, "reason": "time_in_past"}))
            return
        try:
            vote = self.safety.vote(block, tc)
        except SafetyViolation as exc:
            actions.append(Log("vote.refused", {"round": block.round, "reason": exc.reason}))
            return
        next_leader = self.leader_after(block)
        if next_leader == self.index:
            self._on_vote(vote, now, actions)
        else:
            actions.append(Send(next_leader, VoteMsg(vote)))

    def _on_vote(self, vote: Vote, now: float, actions: list[Action]) -> None:
        if vote.round + 1 < self.round:
            return  # stale: that round's certificate is no use any more
        if vote.round > self.round + self.config.pacemaker.max_round_ahead:
            # We are far behind (or the voter lies): no use collecting it either way.
            actions.append(Log("vote.dropped", {"round": vote.round, "reason": "round_too_far"}))
            return
        vote.verify(self.vset)
        digest = vote.data.digest
        earlier = self._vote_digests.get((vote.round, vote.author))
        if earlier is not None:
            if earlier != digest:
                actions.append(Log("vote.equivocation", {"round": vote.round, "author": vote.author}))
            return
        self._vote_digests[(vote.round, vote.author)] = digest
        by_digest = self._votes.setdefault(vote.round, {})
        votes = by_digest.setdefault(digest, {})
        votes[vote.author] = vote
        if len(votes) >= self.vset.quorum and digest not in self._qc_formed:
            self._qc_formed.add(digest)
            self._process_qc(form_qc(list(votes.values())), now, actions)

    # --- certificates and rounds -------------------------------------------------------

    def _process_qc(self, qc: QuorumCert, now: float, actions: list[Action]) -> None:
        """``qc`` is verified. Raise the high QC, commit by the 2-chain rule, advance the round."""
        if qc.round > self.high_qc.round:
            self.high_qc = qc
        if qc.commits_parent and qc.height - 1 > self.root.height:
            if self._pending_commit is None or qc.height > self._pending_commit.height:
                self._pending_commit = qc
            self._try_commit(now, actions)
        self._enter_round(qc.round + 1, now, actions)

    def _process_tc(self, tc: TimeoutCert, now: float, actions: list[Action]) -> None:
        if self.high_tc is None or tc.round > self.high_tc.round:
            self.high_tc = tc
        self._process_qc(tc.high_qc, now, actions)
        self._enter_round(tc.round + 1, now, actions)

    def _try_commit(self, now: float, actions: list[Action]) -> None:
        proof = self._pending_commit
        if proof is None:
            return
        target = proof.data.parent_id
        if proof.height - 1 <= self.root.height:
            self._pending_commit = None
            return
        if target not in self.tree:
            if not self._catching_up:
                self._catching_up = True
                actions.append(Log("sync.started", {"height": self.root.height, "target": proof.height - 1}))
            if proof.height - 1 - self.root.height > RANGE_SYNC_GAP:
                # Far behind: fetch committed blocks forwards, a range at a time, in bounded memory.
                self._request_range(now, actions)
            else:
                self._request_sync(target, now, actions)
            return
        self._pending_commit = None
        self._commit(target, proof, actions)

    def _commit(self, target: bytes, proof: QuorumCert, actions: list[Action]) -> None:
        committed = self.tree.commit(target)
        if not committed:
            return
        self._root_proof = proof
        if self._catching_up and (self._pending_commit is None or self._pending_commit.height - 1 <= self.root.height):
            self._catching_up = False
            self._range_wanted = None
            actions.append(Log("sync.finished", {"height": committed[-1].height}))
        for block in committed:
            for tx in block.payload:
                self._pending_txs.pop(crypto.sha256(tx), None)
        self._prune_below(self.root.round)
        actions.append(CommitBlocks(tuple(committed), proof))

    def _prune_below(self, round_: int) -> None:
        self._proposal_counts = {r: c for r, c in self._proposal_counts.items() if r > round_}
        self._waiting_proposals = {
            bid: (s, p) for bid, (s, p) in self._waiting_proposals.items() if p.block.height > self.root.height
        }
        self._orphans = {bid: b for bid, b in self._orphans.items() if b.height > self.root.height}

    def _enter_round(self, round_: int, now: float, actions: list[Action]) -> None:
        if not self.pacemaker.enter(round_, self.high_qc.round, now):
            return
        keep_from = round_ - 1
        self._votes = {r: v for r, v in self._votes.items() if r >= keep_from}
        self._vote_digests = {k: d for k, d in self._vote_digests.items() if k[0] >= keep_from}
        self._timeouts = {r: t for r, t in self._timeouts.items() if r >= round_}
        if len(self._qc_formed) > 64:
            self._qc_formed.clear()  # only guards against re-forming within live rounds
        if self._is_leader(round_):
            self._maybe_propose(now, actions)

    def _is_leader(self, round_: int) -> bool:
        return self.index is not None and self._leader(round_) == self.index

    def _maybe_propose(self, now: float, actions: list[Action]) -> None:
        self._propose_at = float("inf")
        round_ = self.round
        index = self.index
        if index is None or not self._is_leader(round_) or self._proposed_round >= round_:
            return
        tc: TimeoutCert | None = None
        if self.high_qc.round + 1 != round_:
            if self.high_tc is None or self.high_tc.round + 1 != round_:
                return  # not entered by a certificate for the previous round: nothing to extend safely
            tc = self.high_tc
        parent = self.tree.get(self.high_qc.block_id)
        if not self._pending_txs and self.config.empty_block_delay > 0 and not self._recent_payload(parent):
            # A parent stamped ahead of this clock (within the drift voters allow) does not hold us up.
            ready_at = (min(parent.timestamp / 1000, now) if parent else 0.0) + self.config.empty_block_delay
            if now < ready_at:
                self._propose_at = ready_at
                return
        payload = self._take_payload(parent)
        if (len(self._pending_txs) >= max(1, self.config.pace_backlog) and self.config.min_block_interval > 0
                and parent is not None and parent.payload
                and len(payload) < self.config.max_block_txs
                and sum(map(len, payload)) < MAX_PAYLOAD_BYTES // 2):
            if self._paced[0] != round_:
                # Fixed once: a parent stamped by a clock ahead of ours delays us by the interval only.
                self._paced = (round_, min(parent.timestamp / 1000, now) + self.config.min_block_interval)
            if now < self._paced[1]:
                self._propose_at = self._paced[1]
                return
        self._propose_at = float("inf")
        self._proposed_round = round_
        if payload and self.config.order_payload is not None:
            payload = self.config.order_payload(payload, self.high_qc.block_id)
        try:
            block = self.safety.propose(Block.unsigned(
                epoch=self.vset.epoch, round=round_, qc=self.high_qc, author=index,
                # Never before the parent's time, which voters require (a clock a little behind
                # the previous leader's must not cost the round).
                timestamp=max(int(now * 1000), parent.timestamp if parent else 0), payload=payload,
            ))
        except SafetyViolation as exc:
            actions.append(Log("proposal.refused", {"round": round_, "reason": exc.reason}))
            return
        proposal = Proposal(block, tc)
        self._last_proposal = proposal
        actions.append(Broadcast(proposal))
        actions.append(Log("block.proposed", {"round": round_, "height": block.height, "txs": len(block.payload)}))
        try:
            self._on_proposal(index, proposal, now, actions)
        except InvalidMessage as exc:
            # Our own block failing our own checks is a bug here, not the fault of whichever
            # peer's message moved us into this round: report it, never blame the peer.
            actions.append(Log("proposal.invalid", {"round": round_, "reason": exc.reason, "error": str(exc)}))

    def _recent_payload(self, parent: Block | None) -> bool:
        """Whether the block we would extend, or its parent, carries transactions.

        If so, proposing now is what commits them (the parent) or tells every other
        validator they were committed (the grandparent, committed by our high QC).
        """
        if parent is None:
            return True  # we lack the parent: assume it matters, propose without delay
        if parent.payload:
            return True
        grandparent = self.get_block(parent.parent)
        return grandparent is not None and bool(grandparent.payload)

    def _take_payload(self, parent: Block | None) -> list[bytes]:
        if not self._pending_txs:
            return []
        in_flight: set[bytes] = set()
        if parent is not None:
            for block in self.tree.branch(parent.id):
                in_flight.update(crypto.sha256(tx) for tx in block.payload)
        payload = []
        size = 0
        for tx_id, tx in self._pending_txs.items():
            if tx_id in in_flight:
                continue
            if size + len(tx) > MAX_PAYLOAD_BYTES:
                break
            payload.append(tx)
            size += len(tx)
            if len(payload) >= self.config.max_block_txs:
                break
        return payload

    # --- timeouts ------------------------------------------------------------------------

    def _local_timeout(self, now: float, actions: list[Action]) -> None:
        if self.index is None:
            return  # not a validator of this epoch: it waits for certificates
        try:
            timeout = self.safety.timeout(self.round, self.high_qc, self.high_tc)
        except SafetyViolation as exc:
            actions.append(Log("timeout.refused", {"round": self.round, "reason": exc.reason}))
            return
        actions.append(Broadcast(TimeoutMsg(timeout, self.high_tc)))
        self._collect_timeout(timeout, now, actions)

    def _on_timeout(self, message: TimeoutMsg, now: float, actions: list[Action]) -> None:
        timeout = message.timeout
        justified = max(timeout.high_qc.round, message.high_tc.round if message.high_tc else 0) + 1
        if timeout.round > justified:
            # An honest validator times out only of a round it entered by a certificate it sends along.
            raise InvalidMessage(
                f"timeout: round {timeout.round} is not justified by the certificates it carries (round {justified})",
                reason="unjustified_round",
            )
        timeout.verify(self.vset)
        if message.high_tc is not None:
            message.high_tc.verify(self.vset)
            self._process_tc(message.high_tc, now, actions)
        self._process_qc(timeout.high_qc, now, actions)
        if timeout.round < self.round:
            return
        self._collect_timeout(timeout, now, actions)

    def _collect_timeout(self, timeout: Timeout, now: float, actions: list[Action]) -> None:
        collected = self._timeouts.setdefault(timeout.round, {})
        if timeout.author in collected:
            return
        collected[timeout.author] = timeout
        if timeout.round != self.round:
            return
        # f+1 timeouts mean at least one honest validator gave up: join it rather than wait.
        if len(collected) > self.vset.f and not self.pacemaker.timed_out:
            self.pacemaker.give_up(now)
            self._local_timeout(now, actions)
            return
        if len(collected) >= self.vset.quorum:
            tc = form_tc(list(collected.values()))
            actions.append(Log("tc.formed", {"round": tc.round}))
            self._process_tc(tc, now, actions)

    # --- block sync ---------------------------------------------------------------------

    def _request_sync(
        self, block_id: bytes, now: float, actions: list[Action], *, peer: int | None = None, retry: bool = False
    ) -> None:
        if block_id in self.tree:
            self._sync_wanted.pop(block_id, None)
            return
        if block_id in self._sync_wanted and not retry:
            return
        attempts = self._sync_attempts.get(block_id, 0) + 1
        if attempts > 2 * self.vset.n:
            # Every peer was asked twice: stop; a later certificate will ask again if it still matters.
            self._sync_wanted.pop(block_id, None)
            self._sync_attempts.pop(block_id, None)
            return
        self._sync_attempts[block_id] = attempts
        if peer is None or peer == self.index:
            self._sync_peer = (self._sync_peer + 1) % self.vset.n
            if self._sync_peer == self.index:
                self._sync_peer = (self._sync_peer + 1) % self.vset.n
            peer = self._sync_peer
        self._sync_wanted[block_id] = now + self.config.sync_retry
        actions.append(Send(peer, SyncRequest(block_id, MAX_SYNC_BLOCKS)))

    def _answer_sync(self, request: SyncRequest) -> SyncResponse:
        blocks: list[Block] = []
        size = 0
        current = self.get_block(request.block_id)
        epoch = current.epoch if current is not None else 0
        # The same payload budget as a range answer: the reply must fit in one peer frame. Only
        # blocks of the requested block's epoch: the asker checks them against that epoch's set.
        while (current is not None and not current.is_genesis and current.epoch == epoch
               and len(blocks) < request.count):
            size += sum(len(tx) for tx in current.payload)
            if blocks and size > MAX_RANGE_PAYLOAD:
                break
            blocks.append(current)
            current = self.get_block(current.parent)
        return SyncResponse(tuple(blocks))

    def _on_sync_response(self, sender: int, response: SyncResponse, now: float, actions: list[Action]) -> None:
        blocks = response.blocks
        if not blocks or blocks[0].id not in self._sync_wanted:
            return  # unsolicited or empty: nothing to do, nothing stored
        for newer, older in pairwise(blocks):
            if newer.parent != older.id:
                raise InvalidMessage("sync response: blocks are not a parent chain", reason="bad_chain")
        for block in blocks:
            block.verify(self.vset)
        self._sync_wanted.pop(blocks[0].id, None)
        self._sync_attempts.pop(blocks[0].id, None)
        for block in reversed(blocks):
            if block.height <= self.root.height or block.id in self.tree:
                continue
            if block.parent in self.tree:
                self._insert(block, actions)
            elif len(self._orphans) < self.config.max_orphans:
                self._orphans[block.id] = block
        self._link_orphans(actions)
        oldest = blocks[-1]
        if oldest.parent not in self.tree and oldest.height - 1 > self.root.height:
            self._request_sync(oldest.parent, now, actions, peer=sender)
        for block in blocks:
            if block.qc is not None:
                self._process_qc(block.qc, now, actions)
        self._try_commit(now, actions)
        self._retry_waiting(now, actions)

    def _request_range(
        self, now: float, actions: list[Action], *, start: int | None = None, retry: bool = False,
        peer: int | None = None,
    ) -> None:
        if start is None:
            start = self._range_wanted[0] if retry and self._range_wanted is not None else self.root.height + 1
        if self._range_wanted is not None and self._range_wanted[0] == start and not retry:
            return
        attempts = self._range_wanted[2] + 1 if self._range_wanted is not None and retry else 1
        if attempts > 2 * self.vset.n and not self._catching_up:
            self._range_wanted = None  # a hint of a later epoch nobody could back with blocks
            return
        if peer is not None and peer != self.index:
            self._sync_peer = peer  # asked first; a retry goes on to the next one
        else:
            self._sync_peer = (self._sync_peer + 1) % self.vset.n
            if self._sync_peer == self.index:
                self._sync_peer = (self._sync_peer + 1) % self.vset.n
        self._range_wanted = (start, now + self.config.sync_retry, attempts)
        actions.append(Send(self._sync_peer, RangeRequest(start, MAX_SYNC_BLOCKS)))

    def _answer_range(self, request: RangeRequest) -> RangeResponse:
        blocks: list[Block] = []
        size = 0
        height = request.from_height
        while height <= self.root.height and len(blocks) < request.count and size < MAX_RANGE_PAYLOAD:
            block = self.root if height == self.root.height else self._committed_at(height)
            if block is None or height == 0 or (blocks and block.epoch != blocks[0].epoch):
                break  # one epoch per answer: the asker checks it against that epoch's validators
            blocks.append(block)
            size += sum(len(tx) for tx in block.payload)
            height += 1
        if not blocks:
            return RangeResponse((), None)
        end = self._epoch_end(blocks[-1].epoch) if blocks[-1].epoch < self.vset.epoch else None
        if end is not None and end.last.id == blocks[-1].id:
            # An earlier epoch's last block: prove it with the blocks and certificate that committed
            # it, within the blocks an answer may carry (else stop short; the next range ends it).
            room = MAX_SYNC_BLOCKS - len(end.tail)
            if len(blocks) <= room:
                return RangeResponse((*blocks, *end.tail), end.proof)
            blocks = blocks[:max(room, 1)]
        return RangeResponse(tuple(blocks), self._root_proof if blocks[-1].id == self.root.id else None)

    def _on_range_response(self, sender: int, response: RangeResponse, now: float, actions: list[Action]) -> None:
        wanted = self._range_wanted
        blocks = response.blocks
        if wanted is None or not blocks or blocks[0].height != wanted[0] or blocks[0].height <= self.root.height:
            return  # unsolicited, stale or empty: the retry timer asks another peer
        if blocks[0].parent not in self.tree:
            raise InvalidMessage("range response: first block extends no block we hold", reason="bad_chain")
        for older, newer in pairwise(blocks):
            if newer.parent != older.id or newer.height != older.height + 1:
                raise InvalidMessage("range response: blocks are not a parent chain", reason="bad_chain")
        for block in blocks:
            block.verify(self.vset)
        if response.proof is not None:
            response.proof.verify(self.vset)
        # What the range itself proves committed: by the 2-chain rule, a block whose child is one
        # round later and certified (the grandchild carries the child's certificate), and all its
        # ancestors; or the last block, by the proof sent along.
        last, proof = -1, None
        for i in range(len(blocks) - 2):
            if blocks[i + 1].round == blocks[i].round + 1:
                last, proof = i, blocks[i + 2].qc
        tail = response.proof
        if tail is not None and tail.commits_parent and tail.data.parent_id == blocks[-1].id:
            last, proof = len(blocks) - 1, tail
        self._range_wanted = None
        for block in blocks:
            if block.id not in self.tree:
                self._insert(block, actions)
        if proof is not None and last >= 0:
            self._commit(blocks[last].id, proof, actions)
        elif self._catching_up:
            # Nothing provable in this range yet (rounds skipped by timeouts): keep its blocks and
            # fetch the next range; a later consecutive pair commits them all.
            self._request_range(now, actions, start=blocks[-1].height + 1)
            return
        self._try_commit(now, actions)
        self._retry_waiting(now, actions)

    def _link_orphans(self, actions: list[Action]) -> None:
        linked = True
        while linked and self._orphans:
            linked = False
            for block in sorted(self._orphans.values(), key=lambda b: b.height):
                if block.parent in self.tree:
                    self._insert(block, actions)
                    linked = True

    def _retry_waiting(self, now: float, actions: list[Action]) -> None:
        ready = [(s, p) for s, p in self._waiting_proposals.values() if p.block.parent in self.tree]
        for sender, proposal in ready:
            self._waiting_proposals.pop(proposal.block.id, None)
            try:
                self._on_proposal(sender, proposal, now, actions)
            except InvalidMessage as exc:
                # Checked but for its leader, which needed the parent that just arrived.
                actions.append(Log("proposal.dropped", {"round": proposal.block.round, "reason": exc.reason}))
        # The block a certificate of ours names may just have arrived: it says who leads now.
        if self._proposed_round < self.round and self._is_leader(self.round) and self._propose_at == float("inf"):
            self._maybe_propose(now, actions)

    # --- timers ---------------------------------------------------------------------------

    def _end(self, now: float, actions: list[Action]) -> None:
        """What every input ends with: give up a round an unreachable validator holds, and set
        the timer."""
        if self._unreachable:
            for _ in range(self.vset.n + 1):
                round_ = self.round
                self._skip_unreachable(now, actions)
                if self.round == round_:
                    break  # else our timeout completed a TC: the next round may wait on one too
        self._timer(actions)

    def _skip_unreachable(self, now: float, actions: list[Action]) -> None:
        round_ = self.round
        if self.index is None or self.pacemaker.timed_out or round_ == 0:
            return
        vote = self.safety.data.last_vote
        waits_on: set[int] = set()  # the round is lost if every one of them is unreachable
        if vote is not None and vote.round == round_:
            voted = self.tree.get(vote.block_id)
            if voted is None:
                return
            waits_on.add(self.leader_after(voted))  # where our vote went
        elif self._proposal_counts.get(round_) or any(
                p.block.round == round_ for _, p in self._waiting_proposals.values()):
            return  # this round's proposal is here: it is voted on (or refused) as usual
        else:
            # Who may propose: by reputation after our highest QC, and round robin after our
            # highest TC, when each is for the round before.
            if self.high_qc.round + 1 == round_:
                parent = self.get_block(self.high_qc.block_id)
                if parent is None:
                    return
                waits_on.add(self.leader_after(parent))
            if self.high_tc is not None and self.high_tc.round + 1 == round_:
                waits_on.add(self.vset.leader(round_))
        # This node is never in ``_unreachable``: a round it leads or aggregates is never given up.
        if not waits_on or not waits_on <= self._unreachable:
            return
        actions.append(Log("round.skipped", {"round": round_, "unreachable": min(waits_on)}))
        self.pacemaker.give_up(now)
        self._local_timeout(now, actions)

    def _timer(self, actions: list[Action]) -> None:
        range_at = self._range_wanted[1] if self._range_wanted is not None else float("inf")
        at = min(self.pacemaker.next_wakeup(), self._propose_at, range_at, *self._sync_wanted.values(), float("inf"))
        actions.append(SetTimer(at))


def epoch_of(message: Message) -> int | None:
    """The epoch a proposal, vote, timeout or hint belongs to (sync messages carry none)."""
    if isinstance(message, EpochHint):
        return message.epoch
    if isinstance(message, Proposal):
        return message.block.epoch
    if isinstance(message, VoteMsg):
        return message.vote.data.epoch
    if isinstance(message, TimeoutMsg):
        return message.timeout.epoch
    return None
