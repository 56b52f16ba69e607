"""A deterministic in-memory cluster for the consensus core.

Theory of operation
-------------------
One scenario is a cluster of N validators, each a real :class:`ConsensusCore`
with real Ed25519 keys, on a simulated network driven by a virtual clock (a
priority queue of timestamped events). Every message is encoded to canonical
CBOR and strictly decoded at the receiver, exactly as on a socket.

Everything random is drawn from one seed, so a scenario replays exactly. A
scenario has two phases:

* **faults** (``0 .. stable_at``): message delay with spikes, drops,
  duplicates and reordering; honest validators crash and restart with their
  stores intact; an honest validator slow in everything it sends; partitions
  that heal; Byzantine validators (up to f) behave as drawn: an equivocating
  leader, a double voter, a silent leader, a flaky leader that proposes and then
  goes silent for a while, a leader proposing on stale or forged certificates,
  or a "twin" that restarts having forgotten its safety data;
* **stable** (from ``stable_at``): every honest validator is up and the
  network delivers everything within a bound.

Each validator also learns which of the others it cannot reach (crashed, or
across a partition), a little after each change, as a node learns that a
connection closed (:meth:`ConsensusCore.set_unreachable`); before ``stable_at``
what it learns is now and then wrong, naming a validator it can reach; after it,
an honest validator's link to another still drops for a moment now and then; and
some Byzantine validators report every other validator unreachable, giving up
every round they can at once.

Epochs change too: at a few drawn moments (some with a validator crashing
right after), every validator up submits a marker naming its epoch and the next
epoch's validators; the first committed block of epoch e carrying a marker for
e ends it, and each validator then replaces its core by the next epoch's, rooted
at that block, exactly as a node does when the ledger adopts a membership change.
Blocks its commit carried after that block are not part of its chain. Most
changes change the validators: a spare joins (it has followed nothing until
then, and catches up from genesis through every epoch), an honest validator
leaves, or both at once; validators keep their order, a leaver's place closes
up and a joiner is appended, so a validator's index changes with the epoch.
Byzantine validators stay (at most f of every epoch).

Checks:

* **safety**: no two honest validators commit different blocks at one height,
  and no validator's committed chain ever changes (also across restarts); and
  no certificate of a round above a commit's certifies a block that does not
  extend the committed one (the lemma the commit rule rests on, checked so a
  broken rule is caught even when a later defence hides its effect);
* **liveness**: after ``stable_at``, every honest validator of the newest epoch
  commits three blocks proposed after ``stable_at``, within ``liveness_rounds``
  rounds (counted across epochs).

Also checked all along: an honest validator never signs two different votes,
timeouts or proposals in one round (every save of its safety data and every
proposal it sends is recorded), and every committed block extends the one
committed before it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from . import codec, crypto
from .consensus.core import (
    Action,
    Broadcast,
    CommitBlocks,
    ConsensusCore,
    CoreConfig,
    Log,
    PersistBlock,
    Send,
    SetTimer,
)
from .consensus.messages import (
    Message,
    Proposal,
    SyncResponse,
    TimeoutMsg,
    VoteMsg,
    decode_message,
    encode_message,
)
from .consensus.pacemaker import PacemakerConfig
from .consensus.safety import MemorySafetyStore, SafetyData
from .consensus.types import Block, EpochEnd, QuorumCert, Timeout, ValidatorSet, Vote, form_tc
from .errors import CodecError, InvalidMessage
from .ledger.block_store import MemoryBlockStore

#: Liveness: each honest validator must commit this many blocks proposed after stabilization.
LIVE_COMMITS = 3
#: A scenario handling more events than this is reported as a liveness failure (an event storm).
MAX_EVENTS = 3_000_000
BEHAVIOURS = ("equivocate", "double_vote", "silent", "stale_qc", "forged_qc", "amnesia", "flaky")


@dataclass(frozen=True)
class SimConfig:
    validators: int = 4
    byzantine: int | None = None  # default: f
    stable_at: float = 12.0
    #: After ``stable_at``, give up waiting for liveness at this virtual time.
    horizon: float = 90.0
    liveness_rounds: int | None = None  # default: 3n + 10
    tx_interval: float = 0.05
    behaviours: tuple[str, ...] = BEHAVIOURS
    #: Epoch changes asked for per scenario: drawn between these bounds.
    epoch_changes: tuple[int, int] = (1, 3)
    #: Validators-to-be that an epoch change can add (they run from the start, following nothing).
    spares: int = 2
    #: Test-only: honest validators vote without the 2-chain vote rule.
    unsafe_skip_vote_rule: bool = False
    core: CoreConfig = field(default_factory=lambda: CoreConfig(
        pacemaker=PacemakerConfig(base_timeout=0.5, backoff=1.5, max_timeout=4.0, resend_interval=0.5),
        max_block_txs=50,
        # Paced as a node paces blocks under load, so the fault scenarios cover it too.
        min_block_interval=0.05,
    ))


@dataclass
class ScenarioResult:
    seed: int
    validators: int
    byzantine: dict[int, str]
    safety_violations: list[str]
    liveness_failure: str | None
    commits: int
    rounds_to_commit: int | None
    faults: list[str]
    rejected: int
    #: The highest epoch an honest validator reached.
    epochs: int = 0
    #: Of those epochs, how many started with different validators than the one before.
    membership_changes: int = 0

    @property
    def ok(self) -> bool:
        return not self.safety_violations and self.liveness_failure is None


class _RecordingStore(MemorySafetyStore):
    """Safety data in memory that also reports every save, so the checker sees every signature."""

    def __init__(self, on_save: Callable[[SafetyData], None]) -> None:
        super().__init__()
        self._on_save = on_save

    def save(self, data: SafetyData) -> None:
        super().save(data)
        self._on_save(data)


class _Node:
    """One validator in the simulation: its core, its stores, and whether it is up."""

    def __init__(self, sim: Scenario, node_id: int) -> None:
        self.sim = sim
        self.node_id = node_id
        self.identity = sim.identities[node_id]
        self.block_store = MemoryBlockStore(sim.vset)
        # Durable like the block store: the epoch this validator is in, its validators (node ids,
        # in index order), and how earlier epochs ended.
        self.vset = sim.vset
        self.members: tuple[int, ...] = sim.genesis_members
        self.epoch_ends: dict[int, EpochEnd] = {}
        self.round_base = 0  # rounds of the epochs before this one (for the liveness bound)
        self.behaviour: str | None = sim.byzantine.get(node_id)
        self.safety_store = _RecordingStore(lambda data: sim._signed(node_id, data))
        self.up = True
        self.timer_at = float("inf")
        self.epoch = 0  # bumps on restart so old timers are ignored
        self.timeouts_seen: dict[int, dict[int, Timeout]] = {}
        self.forked_rounds: set[int] = set()
        #: A flaky leader sends nothing until then (it went silent after proposing).
        self.silent_until = 0.0
        #: Added to the delay of everything this validator sends (a slow validator).
        self.slowness = 0.0
        self.core = self._new_core(recover=False)

    @property
    def index(self) -> int | None:
        """This validator's index in its epoch (None: not one of its validators)."""
        return self.members.index(self.node_id) if self.node_id in self.members else None

    def index_of(self, node_id: int) -> int | None:
        return self.members.index(node_id) if node_id in self.members else None

    def _new_core(self, *, recover: bool) -> ConsensusCore:
        honest = self.behaviour is None
        return ConsensusCore(
            self.vset, self.index, self.identity, self.safety_store,
            config=self.sim.config.core,
            recovery=self.block_store.recovery() if recover else None,
            committed_lookup=self.block_store.get_block, committed_at=self.block_store.block_at,
            epoch_end=self.epoch_ends.get,
            unsafe_skip_vote_rule=self.sim.config.unsafe_skip_vote_rule and honest,
        )

    @property
    def progress(self) -> int:
        """Rounds this validator has been through, across epochs."""
        return self.round_base + self.core.round

    def end_epoch(self, last: Block, tail: tuple[Block, ...], proof: QuorumCert,
                  members: tuple[int, ...]) -> list[Action]:
        """``last`` ended this epoch: start the next one's core, rooted at it, with ``members``."""
        self.epoch_ends[self.vset.epoch] = EpochEnd(last, tail, proof)
        self.round_base += self.core.round
        self.members = members
        self.vset = self.vset.successor(last, tuple(self.sim.identities[i].public_key for i in members))
        self.core = self.core.successor(self.vset, self.index)
        return self.core.start(self.sim.now)

    def crash(self) -> None:
        self.up = False
        self.epoch += 1
        self.timer_at = float("inf")

    def restart(self, *, forget: bool) -> list[Action]:
        if forget:
            # A twin that lost its disk: no safety data, no blocks.
            self.safety_store = _RecordingStore(lambda data: self.sim._signed(self.node_id, data))
            self.block_store = MemoryBlockStore(self.sim.vset)
            self.vset, self.members, self.epoch_ends = self.sim.vset, self.sim.genesis_members, {}
        self.up = True
        self.core = self._new_core(recover=not forget)
        return self.core.start(self.sim.now)


class Scenario:
    def __init__(self, seed: int, config: SimConfig) -> None:
        self.seed = seed
        self.config = config
        self.rng = random.Random(seed)
        # What each validator learns of its links (apart, so the faults drawn stay what they were).
        self.link_rng = random.Random(seed ^ 0x11A5)
        n = config.validators
        self.identities = [crypto.Identity.from_seed(crypto.sha256(f"sim-{n}-{i}".encode()))
                           for i in range(n + config.spares)]
        self.genesis_members = tuple(range(n))
        self.vset = ValidatorSet(f"sim-{n}", tuple(self.identities[i].public_key for i in self.genesis_members))
        f = self.vset.f
        count = f if config.byzantine is None else config.byzantine
        if count > f:
            raise ValueError(f"{count} Byzantine validators exceed f={f} for n={n}")
        chosen = self.rng.sample(range(n), count)
        self.byzantine: dict[int, str] = {i: self.rng.choice(config.behaviours) for i in chosen}
        self.honest = [i for i in range(n + config.spares) if i not in self.byzantine]
        # The validators of each epoch (each drawn once, when the epoch before it is asked to end).
        self.memberships: dict[int, tuple[int, ...]] = {0: self.genesis_members}
        self.now = 0.0
        self._queue: list[tuple[float, int, str, tuple]] = []
        self._seq = itertools.count()
        self.nodes = [_Node(self, i) for i in range(n + config.spares)]
        # Fault parameters for the unstable phase.
        self.drop_rate = self.rng.choice((0.0, 0.01, 0.05, 0.15))
        self.dup_rate = self.rng.choice((0.0, 0.02, 0.1))
        self.spike_rate = self.rng.choice((0.0, 0.02, 0.1))
        self.partition: list[set[int]] | None = None
        self.faults: list[str] = [f"drop={self.drop_rate} dup={self.dup_rate} spikes={self.spike_rate}"]
        self.faults += [f"byzantine {i}: {b}" for i, b in sorted(self.byzantine.items())]
        # Byzantine validators that also give up every round they can at once (they report every
        # other validator unreachable): their early timeouts add to any an honest one makes.
        self.eager = {i for i in sorted(self.byzantine) if self.link_rng.random() < 0.3}
        self.faults += [f"byzantine {i}: also times out at once" for i in sorted(self.eager)]
        # Honest validators' links that drop for a moment after GST too (reported down, then up).
        self.blips: dict[int, dict[int, float]] = {}  # node id -> {node id it misses: until}
        # Safety bookkeeping.
        self.committed: dict[int, tuple[bytes, int]] = {}
        self.chains: dict[int, list[bytes]] = {i: [] for i in range(len(self.nodes))}
        self.violations: list[str] = []
        self.commit_count = 0
        self.rejected = 0
        self.stable_round = 0
        self.live_at_round: dict[int, int] = {}
        self.live_commits: dict[int, int] = {}
        self.signatures: dict[tuple[int, str, int, int], bytes] = {}
        self.epochs_ended = 0
        self.events = 0
        # Every verified block and certificate any validator accepted, for the certificate check.
        self.blocks: dict[bytes, Block] = {}
        self.certified: dict[bytes, QuorumCert] = {}
        self.commit_proof_round: dict[int, tuple[int, int]] = {}  # height -> (epoch, round)

    # --- event queue -------------------------------------------------------------------

    def _at(self, when: float, kind: str, *args: object) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), kind, args))

    def _plan_faults(self) -> None:
        rng, stable = self.rng, self.config.stable_at
        validators = [i for i in self.genesis_members if i in self.honest]
        for _ in range(rng.randint(0, 2)):
            node = rng.choice(validators)
            start = rng.uniform(0.5, stable - 2.0)
            down = rng.uniform(0.3, min(4.0, stable - start - 0.5))
            self._at(start, "crash", node)
            self._at(start + down, "restart", node, False)
            self.faults.append(f"crash {node} at {start:.2f}s for {down:.2f}s")
        for _ in range(rng.randint(0, 2)):
            start = rng.uniform(0.5, stable - 2.0)
            length = rng.uniform(0.5, min(5.0, stable - start - 0.5))
            members = list(range(len(self.nodes)))
            rng.shuffle(members)
            cut = rng.randint(1, len(members) - 1)
            groups = [set(members[:cut]), set(members[cut:])]
            self._at(start, "partition", groups)
            self._at(start + length, "heal")
            self.faults.append(f"partition {sorted(groups[0])}|{sorted(groups[1])} at {start:.2f}s for {length:.2f}s")
        if rng.random() < 0.3:
            # A slow validator: everything it sends arrives late, all along (it leads, and votes, late).
            node = rng.choice(validators)
            self.nodes[node].slowness = rng.uniform(0.05, 0.15)
            self.faults.append(f"slow {node}: +{self.nodes[node].slowness:.2f}s on everything it sends")
        if rng.random() < 0.25:
            # Everyone honest goes down at once (a power cut) and comes back at slightly different times.
            start = rng.uniform(1.0, stable - 3.0)
            for node in self.honest:
                self._at(start, "crash", node)
                self._at(start + rng.uniform(0.2, 1.5), "restart", node, False)
            self.faults.append(f"all honest validators crash at {start:.2f}s")
        low, high = self.config.epoch_changes
        for _ in range(rng.randint(low, high)):
            at = rng.uniform(0.5, stable + 5.0)
            self._at(at, "epoch")
            note = f"epoch change asked at {at:.2f}s"
            if at < stable - 1.0 and rng.random() < 0.5:
                # A validator crashes while the change commits.
                node = rng.choice(validators)
                start = at + rng.uniform(0.0, 0.3)
                self._at(start, "crash", node)
                self._at(start + rng.uniform(0.3, min(3.0, stable - start - 0.2)), "restart", node, False)
                note += f", validator {node} crashing at {start:.2f}s"
            self.faults.append(note)
        for index, behaviour in self.byzantine.items():
            if behaviour == "amnesia":
                for _ in range(rng.randint(1, 3)):
                    start = rng.uniform(0.5, stable - 1.0)
                    self._at(start, "crash", index)
                    self._at(start + rng.uniform(0.05, 0.5), "restart", index, True)

    # --- links ---------------------------------------------------------------------------

    def _links_changed(self) -> None:
        """Links went up or down (a crash, a restart, a partition or its end): each validator up
        learns whom it can reach a little later, as a node learns of a connection closed."""
        for node in self.nodes:
            if node.up:
                self._at(self.now + self.link_rng.uniform(0.001, 0.3), "links", node.node_id, node.epoch)

    def _reachable(self, a: int, b: int) -> bool:
        if not self.nodes[b].up:
            return False
        return not self.partition or any(a in g and b in g for g in self.partition)

    def _report_links(self, node: _Node) -> None:
        blips = self.blips.get(node.node_id, {})
        down = [k for k, other in enumerate(node.members)
                if other != node.node_id and (not self._reachable(node.node_id, other)
                                              or node.node_id in self.eager or blips.get(other, 0.0) > self.now)]
        if self.now < self.config.stable_at and self.link_rng.random() < 0.1:
            down.append(self.link_rng.randrange(len(node.members)))  # a detector wrong for a while
        self._apply(node, node.core.set_unreachable(down, self.now))

    def _plan_blips(self) -> None:
        """After GST, now and then an honest validator's link to another drops for a moment."""
        rng, stable = self.link_rng, self.config.stable_at
        for node_id in self.honest:
            for _ in range(rng.randint(0, 3)):
                at, length = rng.uniform(stable, stable + 10.0), rng.uniform(0.05, 0.6)
                self._at(at, "blip", node_id, rng.randrange(len(self.nodes)), at + length)

    # --- network -----------------------------------------------------------------------

    def _send(self, src: int, dst: int, message: Message, data: bytes | None = None) -> None:
        if data is None:
            data = encode_message(message)
        stable = self.now >= self.config.stable_at
        rng = self.rng
        if not stable:
            if self.partition and not any(src in g and dst in g for g in self.partition):
                return
            if rng.random() < self.drop_rate:
                return
        sender = self.nodes[src]
        if self.now < sender.silent_until:
            return
        delay = rng.uniform(0.002, 0.040) + sender.slowness
        if not stable and rng.random() < self.spike_rate:
            delay += rng.uniform(0.2, 2.0)
        self._at(self.now + delay, "deliver", dst, src, data)
        if not stable and rng.random() < self.dup_rate:
            self._at(self.now + delay + rng.uniform(0.0, 0.2), "deliver", dst, src, data)

    def _broadcast(self, src: int, message: Message, to: Iterable[int] | None = None) -> None:
        """Send to every other validator of the sender's epoch (``to``: these node ids)."""
        data = encode_message(message)
        for dst in (self.nodes[src].members if to is None else to):
            if dst != src:
                self._send(src, dst, message, data)

    # --- applying a node's actions --------------------------------------------------------

    def _apply(self, node: _Node, actions: list[Action]) -> None:
        core, members = node.core, node.members  # the core's own validators, even once its epoch ends
        for action in actions:
            if node.core is not core and isinstance(action, (SetTimer, CommitBlocks)):
                continue  # from a core whose epoch ended while its actions were being carried out
            if isinstance(action, (Send, Broadcast)) and node.behaviour is None:
                self._sent(node.node_id, core.index, action.message)
            if isinstance(action, Send):
                if members[action.to] == node.node_id:
                    if node.core is core:
                        self._deliver_local(node, action.message)
                else:
                    self._send(node.node_id, members[action.to], action.message)
            elif isinstance(action, Broadcast):
                if isinstance(action.message, Proposal):
                    self._observe(action.message)
                    if node.behaviour is None:
                        block = action.message.block
                        self._record_signature(node.node_id, "proposal", block.epoch, block.round, block.id)
                if node.behaviour is not None and isinstance(action.message, Proposal):
                    self._byzantine_proposal(node, action.message)
                else:
                    self._broadcast(node.node_id, action.message, [i for i in members if i != node.node_id])
            elif isinstance(action, SetTimer):
                if action.at != node.timer_at and action.at != float("inf"):
                    node.timer_at = action.at
                    self._at(max(action.at, self.now), "timer", node.node_id, node.epoch, action.at)
            elif isinstance(action, PersistBlock):
                node.block_store.put_block(action.block)
            elif isinstance(action, CommitBlocks):
                blocks = action.blocks
                end = next((i for i, b in enumerate(blocks) if _next_members(b) is not None), None)
                kept = blocks if end is None else blocks[:end + 1]
                node.block_store.commit(kept, action.proof)
                self._check_commits(node, kept)
                if node.behaviour is None:
                    for block in kept:
                        seen = self.commit_proof_round.get(block.height)
                        mark = (action.proof.data.epoch, action.proof.round)
                        if block.epoch == action.proof.data.epoch and (seen is None or mark < seen):
                            self.commit_proof_round[block.height] = mark
                if end is not None:
                    self.epochs_ended += 1
                    following = _next_members(blocks[end])
                    assert following is not None
                    self._apply(node, node.end_epoch(blocks[end], blocks[end + 1:], action.proof, following))
                    self._at(self.now + self.link_rng.uniform(0.0, 0.05), "links", node.node_id, node.epoch)
            elif isinstance(action, Log):
                pass

    def _deliver_local(self, node: _Node, message: Message) -> None:
        assert node.index is not None
        self._apply(node, node.core.on_message(node.index, message, self.now))

    def _signed(self, node_id: int, data: SafetyData) -> None:
        """An honest validator signs at most one vote, one timeout and one proposal per round."""
        if node_id in self.byzantine:
            return
        for item in (data.last_vote, data.last_timeout):
            if item is not None:
                self._record_signed(node_id, item)

    def _sent(self, node_id: int, index: int | None, message: Message) -> None:
        """Every vote and timeout an honest validator sends is checked too: a core writes its
        safety data once per input, and what it signed and replaced within one input (two
        rounds' votes after a sync, say) reaches the store only as the last of them."""
        item = message.vote if isinstance(message, VoteMsg) else (
            message.timeout if isinstance(message, TimeoutMsg) else None)
        if item is not None and item.author == index:
            self._record_signed(node_id, item)

    def _record_signed(self, node_id: int, item: Vote | Timeout) -> None:
        kind, epoch = ("vote", item.data.epoch) if isinstance(item, Vote) else ("timeout", item.epoch)
        self._record_signature(node_id, kind, epoch, item.round, crypto.sha256(codec.encode(item.to_wire())))

    def _record_signature(self, index: int, kind: str, epoch: int, round_: int, digest: bytes) -> None:
        seen = self.signatures.setdefault((index, kind, epoch, round_), digest)
        if seen != digest:
            self.violations.append(
                f"honest validator {index} signed two different {kind}s in epoch {epoch} round {round_}")

    def _check_commits(self, node: _Node, blocks: tuple[Block, ...]) -> None:
        chain = self.chains[node.node_id]
        for block in blocks:
            if node.behaviour is None:
                seen = self.committed.get(block.height)
                if seen is None:
                    self.committed[block.height] = (block.id, node.node_id)
                    self.commit_count += 1
                elif seen[0] != block.id:
                    self.violations.append(
                        f"height {block.height}: validator {node.node_id} committed {block.id.hex()[:12]}, "
                        f"validator {seen[1]} committed {seen[0].hex()[:12]}"
                    )
                if block.height <= len(chain):
                    if chain[block.height - 1] != block.id:
                        self.violations.append(
                            f"validator {node.node_id} re-committed height {block.height} differently")
                elif block.height != len(chain) + 1:
                    self.violations.append(f"validator {node.node_id} skipped to height {block.height}")
                else:
                    parent = chain[-1] if chain else self.vset.genesis_id
                    if block.parent != parent:
                        self.violations.append(
                            f"validator {node.node_id} committed height {block.height} not extending its height "
                            f"{block.height - 1}"
                        )
                    chain.append(block.id)
            if (
                block.timestamp >= self.config.stable_at * 1000 and self.now >= self.config.stable_at
                and node.node_id not in self.live_at_round and node.behaviour is None
            ):
                self.live_commits[node.node_id] = self.live_commits.get(node.node_id, 0) + 1
                if self.live_commits[node.node_id] >= LIVE_COMMITS:
                    self.live_at_round[node.node_id] = self._honest_progress()

    def _observe(self, message: Message) -> None:
        """Remember blocks and certificates a validator accepted (so they verified)."""
        qcs: list[QuorumCert] = []
        if isinstance(message, Proposal):
            self.blocks.setdefault(message.block.id, message.block)
            qcs.append(message.block.qc)  # type: ignore[arg-type]
            if message.tc is not None:
                qcs.append(message.tc.high_qc)
        elif isinstance(message, TimeoutMsg):
            qcs.append(message.timeout.high_qc)
            if message.high_tc is not None:
                qcs.append(message.high_tc.high_qc)
        elif isinstance(message, SyncResponse):
            for block in message.blocks:
                self.blocks.setdefault(block.id, block)
                qcs.append(block.qc)  # type: ignore[arg-type]
        for qc in qcs:
            if qc.round > 0:
                self.certified.setdefault(qc.data.digest, qc)

    def _check_certificates(self) -> None:
        """Once a block is committed by a certificate of round p, every certificate of a higher
        round must certify one of its descendants (the lemma the 2-chain rule rests on)."""
        for qc in self.certified.values():
            block_id, height = qc.block_id, qc.height
            while height > 0:
                committed = self.committed.get(height)
                if committed is not None:
                    if committed[0] == block_id:
                        break
                    proof = self.commit_proof_round.get(height)
                    # The lemma holds within an epoch: rounds of different epochs do not compare.
                    if proof is not None and proof[0] == qc.data.epoch and qc.round > proof[1]:
                        proof_round = proof[1]
                        self.violations.append(
                            f"certificate of round {qc.round} for {qc.block_id.hex()[:12]} conflicts with height "
                            f"{height}, committed by a certificate of round {proof_round}"
                        )
                        break
                block = self.blocks.get(block_id)
                if block is None:
                    break
                block_id, height = block.parent, height - 1

    # --- Byzantine behaviours --------------------------------------------------------------

    def _byzantine_proposal(self, node: _Node, proposal: Proposal) -> None:
        behaviour, rng = node.behaviour, self.rng
        others = [i for i in node.members if i != node.node_id]
        rng.shuffle(others)
        block = proposal.block
        qc = block.qc
        assert qc is not None
        if behaviour == "silent":
            return
        if behaviour == "flaky":
            # Proposes like an honest leader, then goes silent for a while: no votes, no
            # timeouts, and no proposal if it leads again in the meantime.
            self._broadcast(node.node_id, proposal, others)
            node.silent_until = self.now + rng.uniform(0.5, 3.0)
            return
        if behaviour == "stale_qc":
            # Show the new certificate to one validator only; the others will time out, and
            # the timeouts let this leader build a certificate that hides it (_stale_fork).
            self._broadcast(node.node_id, proposal, others[:1])
            return
        if behaviour in ("equivocate", "forged_qc", "double_vote"):
            if behaviour == "forged_qc":
                qc = QuorumCert(qc.data, tuple((i, rng.randbytes(64)) for i in range(node.vset.quorum)))
            twin = Block.propose(
                epoch=block.epoch, round=block.round, qc=qc, author=block.author, timestamp=block.timestamp + 1,
                payload=(rng.randbytes(16),), identity=node.identity, chain_id=self.vset.chain_id,
            )
            half = len(others) // 2
            self._broadcast(node.node_id, proposal, others[:half])
            self._broadcast(node.node_id, Proposal(twin, proposal.tc), others[half:])
            if behaviour == "double_vote":
                self._double_vote(node, twin)
            return
        self._broadcast(node.node_id, proposal)

    def _stale_fork(self, node: _Node, sender: int, timeout: Timeout) -> None:
        """A leader that hid a certificate joins the others' timeouts with an old certificate of its own,
        forms the timeout certificate, and proposes a block on a certificate older than the one it hid."""
        round_ = timeout.round
        if node.index is None or node.vset.leader(round_ + 1) != node.index:
            return
        seen = node.timeouts_seen.setdefault(round_, {})
        seen[sender] = timeout
        if node.index not in seen:
            own = Timeout.create(
                timeout.epoch, round_, timeout.high_qc, node.index, node.identity, self.vset.chain_id
            )
            seen[node.index] = own
            self._broadcast(node.node_id, TimeoutMsg(own))
        if len(seen) < node.vset.quorum or round_ in node.forked_rounds:
            return
        node.forked_rounds.add(round_)
        tc = form_tc(list(seen.values()))
        qc = tc.high_qc
        for _ in range(self.rng.randint(1, 3)):
            parent = node.core.get_block(qc.block_id)
            if parent is None or parent.qc is None or parent.is_genesis:
                break
            qc = parent.qc
        block = Block.propose(
            epoch=tc.epoch, round=round_ + 1, qc=qc, author=node.index, timestamp=int(self.now * 1000),
            payload=(self.rng.randbytes(16),), identity=node.identity, chain_id=self.vset.chain_id,
        )
        self._broadcast(node.node_id, Proposal(block, tc), [node.members[i] for i in seen if i != node.index])
        self._double_vote(node, block)

    def _double_vote(self, node: _Node, block: Block) -> None:
        if block.qc is None or node.index is None or block.epoch != node.vset.epoch:
            return
        vote = Vote.create(block.vote_data(), node.index, node.identity, self.vset.chain_id)
        leader = node.core.leader_after(block)
        if leader != node.index:
            self._send(node.node_id, node.members[leader], VoteMsg(vote))

    # --- running -----------------------------------------------------------------------

    def _inject_txs(self) -> None:
        tx = self.rng.randbytes(32)
        for node in self.nodes:
            if node.up:
                self._apply(node, node.core.submit([tx], self.now))

    def run(self) -> ScenarioResult:
        config = self.config
        liveness_rounds = config.liveness_rounds or 3 * self.vset.n + 10
        self._plan_faults()
        self._plan_blips()
        for node in self.nodes:
            self._apply(node, node.core.start(0.0))
        self._at(config.stable_at, "stable")
        next_tx = 0.0
        while self._queue:
            when, _, kind, args = heapq.heappop(self._queue)
            if when > config.horizon:
                break
            while next_tx <= when:
                self.now = next_tx
                self._inject_txs()
                next_tx += config.tx_interval
            self.now = when
            self.events += 1
            if self.events > MAX_EVENTS:
                break
            self._event(kind, args)
            if self.now >= config.stable_at and all(i in self.live_at_round for i in self._must_be_live()):
                break
        self._check_certificates()
        liveness_failure = None
        missing = [i for i in self._must_be_live() if i not in self.live_at_round]
        if self.events > MAX_EVENTS:
            liveness_failure = f"more than {MAX_EVENTS} events by {self.now:.2f}s: an event storm"
        elif missing:
            liveness_failure = (
                f"validators {missing} committed fewer than {LIVE_COMMITS} new blocks between {config.stable_at}s "
                f"and {config.horizon}s"
            )
        rounds = max((r - self.stable_round for r in self.live_at_round.values()), default=None)
        if rounds is not None and rounds > liveness_rounds and liveness_failure is None:
            liveness_failure = f"first commit after stabilization took {rounds} rounds (bound {liveness_rounds})"
        reached = max(self.nodes[i].vset.epoch for i in self.honest)
        return ScenarioResult(
            self.seed, self.vset.n, dict(self.byzantine), list(self.violations), liveness_failure,
            self.commit_count, rounds, self.faults, self.rejected, reached,
            sum(set(self.memberships[e]) != set(self.memberships[e - 1]) for e in range(1, reached + 1)),
        )

    def _honest_progress(self) -> int:
        """The rounds the honest validators that must be live have been through (the furthest of them).

        Only theirs: a Byzantine twin that forgot its disk replays the early epochs and counts their
        rounds again, and a validator that left keeps timing out alone in its last epoch; neither is
        the consortium's progress (seed 516089 at n=4 was a twin's replay, reported as 26 rounds).
        """
        return max(self.nodes[i].progress for i in self._must_be_live())

    def _must_be_live(self) -> list[int]:
        """The honest validators of the newest epoch an honest validator reached."""
        reached = max(self.nodes[i].vset.epoch for i in self.honest)
        return [i for i in self.memberships[reached] if i in self.honest]

    def _event(self, kind: str, args: tuple) -> None:
        if kind == "deliver":
            dst, src, data = args
            node = self.nodes[dst]
            if not node.up:
                return
            sender = node.index_of(src)
            if sender is None:
                return  # as a node ignores a peer that is not a validator of its epoch
            try:
                message = decode_message(data)
                actions = node.core.on_message(sender, message, self.now)
            except (CodecError, InvalidMessage):
                self.rejected += 1
                return
            self._observe(message)
            self._apply(node, actions)
            if node.behaviour in ("double_vote", "stale_qc") and isinstance(message, Proposal):
                self._double_vote(node, message.block)
            if node.behaviour == "stale_qc" and isinstance(message, TimeoutMsg):
                self._stale_fork(node, sender, message.timeout)
        elif kind == "timer":
            index, epoch, at = args
            node = self.nodes[index]
            if node.up and node.epoch == epoch and node.timer_at == at:
                node.timer_at = float("inf")
                self._apply(node, node.core.tick(self.now))
        elif kind == "crash":
            self.nodes[args[0]].crash()
            self._links_changed()
        elif kind == "restart":
            index, forget = args
            node = self.nodes[index]
            if not node.up:
                self._apply(node, node.restart(forget=forget))
                self._links_changed()
        elif kind == "partition":
            self.partition = args[0]
            self._links_changed()
        elif kind == "heal":
            self.partition = None
            self._links_changed()
        elif kind == "links":
            index, epoch = args
            node = self.nodes[index]
            if node.up and node.epoch == epoch:
                self._report_links(node)
        elif kind == "blip":
            index, other, until = args
            node = self.nodes[index]
            if node.up and other != index:
                self.blips.setdefault(index, {})[other] = until
                self._report_links(node)
                self._at(until, "links", index, node.epoch)
        elif kind == "stable":
            self.partition = None
            for node in self.nodes:
                if not node.up and node.behaviour is None:
                    self._apply(node, node.restart(forget=False))
            self._links_changed()
            self.stable_round = self._honest_progress()
        elif kind == "epoch":
            for node in self.nodes:
                if node.up and node.index is not None:
                    marker = _marker(node.vset.epoch, self._next_for(node.vset.epoch))
                    self._apply(node, node.core.submit([marker], self.now))

    def _next_for(self, epoch: int) -> tuple[int, ...]:
        """The validators epoch ``epoch + 1`` will have (drawn the first time it is asked)."""
        following = self.memberships.get(epoch + 1)
        if following is not None:
            return following
        current, rng = self.memberships[epoch], self.rng
        ever = {i for members in self.memberships.values() for i in members}
        spares = [i for i in range(len(self.nodes)) if i not in ever]
        leavers = [i for i in current if i in self.honest] if len(current) > self.config.validators else []
        choices = ["same"] + ["add"] * bool(spares) + ["remove"] * bool(leavers) + ["swap"] * bool(
            spares and [i for i in current if i in self.honest])
        change = rng.choice(choices)
        members = current
        if change in ("remove", "swap"):
            leaver = rng.choice(leavers or [i for i in current if i in self.honest])
            members = tuple(i for i in members if i != leaver)
        if change in ("add", "swap"):
            members = (*members, rng.choice(spares))
        self.memberships[epoch + 1] = members
        self.faults.append(f"epoch {epoch} -> {epoch + 1}: {change}, validators {list(members)}")
        return members


def _marker(epoch: int, members: tuple[int, ...]) -> bytes:
    """The simulator's stand-in for a governance transaction: it ends ``epoch`` with ``members`` next."""
    return b"epoch:%d:%s" % (epoch, ",".join(map(str, members)).encode())


def _next_members(block: Block) -> tuple[int, ...] | None:
    """The next epoch's validators, if ``block`` ends its epoch (its first marker for it decides)."""
    prefix = b"epoch:%d:" % block.epoch
    for entry in block.payload:
        if entry.startswith(prefix):
            return tuple(int(i) for i in entry[len(prefix):].split(b","))
    return None


def run_scenario(seed: int, config: SimConfig) -> ScenarioResult:
    return Scenario(seed, config).run()


def replay_command(seed: int, config: SimConfig) -> str:
    byz = "" if config.byzantine is None else f" --byzantine {config.byzantine}"
    return f"ehrnode sim --scenarios 1 --seed {seed} --validators {config.validators}{byz}"


def scenario_configs(validators: int, byzantine: int | None, **overrides: object) -> SimConfig:
    return replace(SimConfig(), validators=validators, byzantine=byzantine, **overrides)  # type: ignore[arg-type]
