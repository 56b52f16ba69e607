"""The core driven directly: messages delivered in order, the clock moved by hand."""

from dataclasses import replace
from itertools import pairwise

import pytest

from ehrnode.consensus.core import (
    Broadcast,
    CommitBlocks,
    ConsensusCore,
    CoreConfig,
    PersistBlock,
    Send,
    SetTimer,
)
from ehrnode.consensus.messages import (
    Proposal,
    RangeRequest,
    RangeResponse,
    SyncRequest,
    SyncResponse,
    TimeoutMsg,
    VoteMsg,
    encode_message,
)
from ehrnode.consensus.pacemaker import PacemakerConfig
from ehrnode.consensus.safety import MemorySafetyStore
from ehrnode.errors import InvalidMessage
from ehrnode.ledger.block_store import MemoryBlockStore

from .factory import Factory

CONFIG = CoreConfig(pacemaker=PacemakerConfig(base_timeout=1.0, resend_interval=0.5), max_block_txs=10)


class Cluster:
    def __init__(self, n=4, down=(), config=CONFIG):
        self.config = config
        self.f = Factory(n)
        self.stores = [MemorySafetyStore() for _ in range(n)]
        self.blocks = [MemoryBlockStore(self.f.vset) for _ in range(n)]
        self.cores = [self._core(i) for i in range(n)]
        self.down = set(down)
        self.queue = []
        self.now = 0.0
        self.committed = [[] for _ in range(n)]
        self.timers = [float("inf")] * n

    def _core(self, i, recover=False):
        return ConsensusCore(
            self.f.vset, i, self.f.identities[i], self.stores[i], config=self.config,
            recovery=self.blocks[i].recovery() if recover else None, committed_lookup=self.blocks[i].get_block,
            committed_at=self.blocks[i].block_at,
        )

    def apply(self, i, actions):
        for a in actions:
            if isinstance(a, Send):
                self.queue.append((a.to, i, a.message))
            elif isinstance(a, Broadcast):
                self.queue.extend((j, i, a.message) for j in range(len(self.cores)) if j != i)
            elif isinstance(a, SetTimer):
                self.timers[i] = a.at
            elif isinstance(a, PersistBlock):
                self.blocks[i].put_block(a.block)
            elif isinstance(a, CommitBlocks):
                self.blocks[i].commit(a.blocks, a.proof)
                self.committed[i].extend(b.id for b in a.blocks)

    def start(self):
        for i, core in enumerate(self.cores):
            if i not in self.down:
                self.apply(i, core.start(self.now))

    def run(self, until, max_steps=100_000, done=lambda: False):
        steps = 0
        while self.now < until and steps < max_steps and not done():
            steps += 1
            if self.queue:
                dst, src, msg = self.queue.pop(0)
                if dst not in self.down:
                    self.apply(dst, self.cores[dst].on_message(src, msg, self.now))
                continue
            live = [i for i in range(len(self.cores)) if i not in self.down]
            nxt = min(self.timers[i] for i in live)
            if nxt == float("inf") or nxt > until:
                break
            self.now = max(self.now, nxt)
            for i in live:
                if self.timers[i] <= self.now:
                    self.apply(i, self.cores[i].tick(self.now))


class CheckedCluster(Cluster):
    """Fails as soon as a core hands over a signed message its safety store does not know of."""

    def apply(self, i, actions):
        stored = self.stores[i].data
        for a in actions:
            message = a.message if isinstance(a, (Send, Broadcast)) else None
            if isinstance(message, VoteMsg) and message.vote.author == i:
                assert stored.last_voted_round >= message.vote.round, (i, message)
            elif isinstance(message, Proposal) and message.block.author == i:
                assert stored.last_proposed_round >= message.block.round, (i, message)
            elif isinstance(message, TimeoutMsg) and message.timeout.author == i:
                assert stored.last_voted_round >= message.timeout.round, (i, message)
        super().apply(i, actions)


def test_nothing_signed_leaves_a_core_before_its_safety_store_holds_it():
    c = CheckedCluster(down={3})  # timeouts too: validator 3 leads round 3
    c.start()
    for i, core in enumerate(c.cores[:3]):
        c.apply(i, core.submit([b"tx-%d" % k for k in range(12)], c.now))
    c.run(until=6.0, max_steps=5000)
    assert min(core.committed_height for core in c.cores[:3]) >= 3
    assert any(core.pacemaker.round > 3 for core in c.cores[:3])


def test_a_leader_writes_its_proposal_and_its_own_vote_for_it_in_one_save():
    c = Cluster()
    leader = c.f.vset.leader(1)
    before = c.stores[leader].saves
    actions = c.cores[leader].start(c.now)
    assert any(isinstance(a, Broadcast) and isinstance(a.message, Proposal) for a in actions)
    data = c.stores[leader].data
    assert (data.last_proposed_round, data.last_voted_round) == (1, 1)
    assert c.stores[leader].saves == before + 1


def test_all_validators_commit_the_same_blocks_with_every_transaction_once():
    c = Cluster()
    c.start()
    txs = [f"tx-{k}".encode() for k in range(25)]
    for i, core in enumerate(c.cores):
        c.apply(i, core.submit(txs, c.now))
    c.run(until=0.5, max_steps=3000)
    heights = [core.committed_height for core in c.cores]
    assert min(heights) >= 3
    shortest = min(len(x) for x in c.committed)
    assert all(x[:shortest] == c.committed[0][:shortest] for x in c.committed)
    included = [tx for h in range(1, c.blocks[0].committed_height() + 1) for tx in c.blocks[0].block_at(h).payload]
    assert sorted(set(included)) == sorted(included)  # no transaction twice
    assert set(txs) <= set(included)


def test_a_silent_validator_is_timed_out_and_commits_continue():
    c = Cluster(down={1})
    c.start()
    c.run(until=20.0, max_steps=20_000, done=lambda: min(c.cores[i].committed_height for i in (0, 2, 3)) >= 3)
    for i in (0, 2, 3):
        assert c.cores[i].committed_height >= 3
    assert c.cores[0].high_tc is not None  # leader 1's rounds ended by timeout certificates


def test_a_crashed_validator_stops_being_chosen_to_lead():
    # Round robin hands the crashed validator every fourth round, each a timeout; with leader
    # reputation it drops out of the candidates once the window of history no longer shows it.
    c = Cluster(down={1})
    c.start()
    c.run(until=30.0, max_steps=200_000, done=lambda: c.cores[0].committed_height >= 40)
    assert c.cores[0].committed_height >= 40
    tc_round = c.cores[0].high_tc.round if c.cores[0].high_tc else 0
    height = c.cores[0].committed_height
    c.run(until=c.now + 10.0, max_steps=200_000, done=lambda: c.cores[0].committed_height >= height + 40)
    assert c.cores[0].committed_height >= height + 40
    # No timeout certificate since: no round was handed to the crashed validator.
    assert (c.cores[0].high_tc.round if c.cores[0].high_tc else 0) == tc_round
    head = c.blocks[0].block_at(c.blocks[0].committed_height())
    assert c.cores[0].leader_after(head) != 1
    recent = [c.blocks[0].block_at(h) for h in range(height + 1, c.blocks[0].committed_height() + 1)]
    assert {b.author for b in recent} == {0, 2, 3}


def test_rounds_that_wait_on_a_validator_whose_link_is_down_are_given_up_at_once():
    # Without the links: round 1's leader is the crashed validator, and nothing moves before the
    # first timeout (1 s).
    slow = Cluster(down={1})
    slow.start()
    slow.run(until=0.5, max_steps=20_000)
    assert max(slow.cores[i].committed_height for i in (0, 2, 3)) == 0
    # Told the link is down, the others give up its rounds (and the rounds whose votes go to it)
    # as they come: many blocks commit before any timer fires.
    c = Cluster(down={1})
    c.start()
    for i in (0, 2, 3):
        c.apply(i, c.cores[i].set_unreachable([1], c.now))
    c.run(until=0.5, max_steps=50_000, done=lambda: min(c.cores[i].committed_height for i in (0, 2, 3)) >= 20)
    assert min(c.cores[i].committed_height for i in (0, 2, 3)) >= 20
    assert c.now < 1.0
    shortest = min(len(c.committed[i]) for i in (0, 2, 3))
    assert all(c.committed[i][:shortest] == c.committed[0][:shortest] for i in (2, 3))


def test_a_link_wrongly_reported_down_costs_no_commits():
    c = Cluster()
    c.start()
    c.apply(0, c.cores[0].set_unreachable([1, 2], c.now))  # only validator 0 believes it, and wrongly
    c.run(until=5.0, max_steps=50_000, done=lambda: min(core.committed_height for core in c.cores) >= 20)
    assert min(core.committed_height for core in c.cores) >= 20
    c.apply(0, c.cores[0].set_unreachable([], c.now))
    height = c.cores[0].committed_height
    c.run(until=c.now + 5.0, max_steps=50_000, done=lambda: c.cores[0].committed_height >= height + 10)
    assert c.cores[0].committed_height >= height + 10


def test_every_validator_chooses_the_same_leader_and_a_proposal_by_another_is_refused():
    c = Cluster(down={1})
    c.start()
    c.run(until=30.0, max_steps=200_000, done=lambda: min(c.cores[i].committed_height for i in (0, 2, 3)) >= 30)
    head = c.blocks[0].block_at(25)
    assert len({c.cores[i].leader_after(head) for i in (0, 2, 3)}) == 1
    leader = c.cores[2].leader_after(head)
    qc = c.f.qc(head)
    impostor = next(i for i in (0, 2, 3) if i != leader)
    block = c.f.block(head.round + 1, qc, author=impostor)
    assert c.cores[2].leader_of(block) == leader
    with pytest.raises(InvalidMessage) as err:
        c.cores[2].on_message(impostor, Proposal(block), c.now)
    assert err.value.reason == "not_leader"


def test_a_round_entered_by_a_timeout_certificate_is_led_round_robin():
    f = Factory(4)
    core = ConsensusCore(f.vset, 0, f.identities[0], MemorySafetyStore(), config=CONFIG)
    core.start(0.0)
    (b1,) = f.chain([1])
    late = f.block(5, f.qc(b1), author=f.vset.leader(5))  # rounds 2-4 timed out
    assert core.leader_of(late) == f.vset.leader(5)


def test_leader_window_zero_is_round_robin():
    c = Cluster(down={1}, config=replace(CONFIG, leader_window=0))
    c.start()
    c.run(until=60.0, max_steps=200_000, done=lambda: c.cores[0].committed_height >= 20)
    head = c.blocks[0].block_at(c.blocks[0].committed_height())
    assert c.cores[0].leader_after(head) == c.f.vset.leader(head.round + 1)


def test_two_of_four_down_means_no_commits_and_no_crash_then_recovery():
    c = Cluster(down={2, 3})
    c.start()
    c.run(until=10.0, max_steps=5000)
    assert all(c.cores[i].committed_height == 0 for i in (0, 1))
    c.down.clear()
    for i in (2, 3):
        c.apply(i, c.cores[i].start(c.now))
    c.run(until=c.now + 30.0, max_steps=50_000, done=lambda: min(x.committed_height for x in c.cores) >= 2)
    assert min(core.committed_height for core in c.cores) >= 2


def test_restart_reloads_blocks_and_safety_data_and_never_votes_twice_in_a_round():
    c = Cluster()
    c.start()
    c.run(until=0.3, max_steps=2000)
    before = c.cores[2].committed_height
    last_vote = c.stores[2].data.last_vote
    c.cores[2] = c._core(2, recover=True)
    assert c.cores[2].committed_height == before
    c.apply(2, c.cores[2].start(c.now))
    assert c.cores[2].round >= last_vote.round
    # The proposal it already voted on, delivered again, gets the very same vote.
    block = c.blocks[2].get_block(last_vote.block_id) or c.cores[2].get_block(last_vote.block_id)
    if block is not None and block.round == c.cores[2].round:
        actions = c.cores[2].on_message(block.author, Proposal(block), c.now)
        votes = [a.message.vote for a in actions if isinstance(a, Send) and isinstance(a.message, VoteMsg)]
        assert votes in ([], [last_vote])
    c.queue.clear()
    c.run(until=c.now + 5.0, max_steps=20_000, done=lambda: c.cores[2].committed_height > before)
    assert c.cores[2].committed_height > before


def invalid(core, sender, message, now=0.0):
    before = core.safety.data
    with pytest.raises(InvalidMessage) as err:
        core.on_message(sender, message, now)
    assert core.safety.data == before
    return err.value.reason


def test_invalid_messages_are_refused_with_a_reason_and_leave_safety_data_unchanged():
    c = Cluster()
    c.start()
    f, core = c.f, c.cores[2]
    b1 = f.block(1, f.genesis_qc)
    assert invalid(core, 1, Proposal(replace(b1, signature=bytes(64)))) == "bad_signature"
    assert invalid(core, 1, Proposal(f.block(1, f.genesis_qc, author=3))) == "not_leader"
    qc1 = f.qc(b1)
    dup = replace(qc1, signatures=(qc1.signatures[0],) * 3)
    assert invalid(core, 2, Proposal(f.block(2, dup))) == "duplicate_signer"
    assert invalid(core, 1, VoteMsg(replace(f.vote(b1, 3), signature=bytes(64)))) == "bad_signature"
    t = f.timeout(10**12, qc1, 3)
    assert invalid(core, 3, TimeoutMsg(t)) == "unjustified_round"
    far_block = f.block(10**12, qc1)
    assert invalid(core, far_block.author, Proposal(far_block)) == "unjustified_round"
    # A vote far ahead is dropped (we may simply be behind), not stored.
    far = f.vote(f.block(10**12, qc1), 3)
    actions = core.on_message(3, VoteMsg(far), 0.0)
    assert any(getattr(a, "event", "") == "vote.dropped" for a in actions)
    with pytest.raises(InvalidMessage) as err:
        core.on_message(99, VoteMsg(f.vote(b1, 3)), 0.0)
    assert err.value.reason == "unknown_signer"
    tc = f.tc(5, [f.genesis_qc] * 3)
    assert invalid(core, 1, Proposal(b1, tc)) == "tc_mismatch"


def test_a_certificate_for_an_unknown_block_asks_a_peer_and_unsolicited_blocks_are_ignored():
    c = Cluster()
    f = c.f
    core = c.cores[0]
    c.apply(0, core.start(0.0))
    b1, b2, b3 = f.chain([1, 2, 3])
    actions = core.on_message(0, Proposal(f.block(4, f.qc(b3))), 0.0)
    requests = [a for a in actions if isinstance(a, Send) and isinstance(a.message, SyncRequest)]
    assert requests and core.round == 4
    # An answer nobody asked for is dropped.
    unsolicited = core.on_message(1, SyncResponse((f.block(1, f.genesis_qc, payload=(b"x",)),)), 0.0)
    assert not [a for a in unsolicited if isinstance(a, (PersistBlock, CommitBlocks))]
    assert core.committed_height == 0
    # The real answer links in and the 2-chain rule commits b2 (b3's round is b2's + 1).
    wanted = requests[0].message.block_id
    chain = {b.id: b for b in (b1, b2, b3)}
    response = []
    cursor = chain.get(wanted)
    while cursor is not None:
        response.append(cursor)
        cursor = chain.get(cursor.parent)
    actions = core.on_message(1, SyncResponse(tuple(response)), 0.0)
    commits = [a for a in actions if isinstance(a, CommitBlocks)]
    assert core.committed_height >= 2
    assert commits and [b.height for b in commits[0].blocks][0] == 1


def test_a_sync_response_whose_blocks_do_not_chain_is_refused():
    c = Cluster()
    f, core = c.f, c.cores[0]
    c.apply(0, core.start(0.0))
    b1, b2, b3 = f.chain([1, 2, 3])
    core.on_message(0, Proposal(f.block(4, f.qc(b3))), 0.0)
    with pytest.raises(InvalidMessage) as err:
        core.on_message(1, SyncResponse((b3, b1)), 0.0)
    assert err.value.reason == "bad_chain"


def test_a_whole_cluster_restart_in_a_round_entered_by_timeout_certificate_recovers():
    c = Cluster(down={1})
    c.start()
    # Run until the live validators sit in a round they entered by a timeout certificate.
    c.run(until=30.0, max_steps=20_000, done=lambda: c.cores[0].high_tc is not None
          and c.cores[0].round == c.cores[0].high_tc.round + 1
          and c.stores[0].data.last_voted_round == c.cores[0].round)
    assert c.cores[0].high_tc is not None
    before = min(c.cores[i].committed_height for i in (0, 2, 3))
    c.queue.clear()
    c.down.clear()
    for i in range(4):
        c.cores[i] = c._core(i, recover=True)
        c.apply(i, c.cores[i].start(c.now))
    assert c.cores[0].high_tc is not None  # reloaded from the safety data, not from any block
    c.run(until=c.now + 60.0, max_steps=50_000, done=lambda: min(x.committed_height for x in c.cores) > before + 2)
    assert min(x.committed_height for x in c.cores) > before + 2


def test_a_leader_never_proposes_twice_in_a_round_even_after_a_restart():
    c = Cluster()
    c.start()
    c.run(until=0.2, max_steps=500)
    leader = c.cores[0].vset.leader(c.cores[0].round)
    proposed = c.stores[leader].data.last_proposed_round
    assert proposed > 0
    c.cores[leader] = c._core(leader, recover=True)
    actions = c.cores[leader].start(c.now)
    again = [a for a in actions if isinstance(a, Broadcast) and isinstance(a.message, Proposal)
             and a.message.block.round <= proposed]
    assert again == []


def test_a_validator_far_behind_catches_up_by_committed_ranges():
    c = Cluster(down={3})
    c.start()
    c.run(until=600.0, max_steps=400_000, done=lambda: c.cores[0].committed_height >= 120)
    assert c.cores[0].committed_height >= 120 and c.cores[3].committed_height == 0
    c.down.clear()
    sent_ranges = []
    original = c.apply

    def spy(i, actions):
        if i == 3:
            sent_ranges.extend(a for a in actions if isinstance(a, Send) and isinstance(a.message, RangeRequest))
        original(i, actions)

    c.apply = spy
    c.apply(3, c.cores[3].start(c.now))
    target = c.cores[0].committed_height
    c.run(until=c.now + 60.0, max_steps=200_000, done=lambda: c.cores[3].committed_height >= target)
    assert c.cores[3].committed_height >= target
    assert len(sent_ranges) >= 2  # fetched forwards in ranges, not block by block backwards
    assert len(c.cores[3]._orphans) == 0
    assert c.committed[3][:target] == c.committed[0][:target]


def test_a_range_that_does_not_extend_the_root_is_refused():
    c = Cluster()
    f, core = c.f, c.cores[0]
    core.start(0.0)
    core._range_wanted = (1, 10.0, 1)
    b1, b2, b3 = f.chain([1, 2, 3])
    with pytest.raises(InvalidMessage) as err:
        core.on_message(1, RangeResponse((replace(b1, parent=b"\x01" * 32), b2), None), 0.0)
    assert err.value.reason == "bad_chain"
    # A range that does not start where we asked is not ours: ignored, nothing stored.
    assert not [a for a in core.on_message(1, RangeResponse((b2, b3), None), 0.0)
                if isinstance(a, (PersistBlock, CommitBlocks))]
    with pytest.raises(InvalidMessage) as err:
        core.on_message(1, RangeResponse((b1, b3), None), 0.0)
    assert err.value.reason == "bad_chain"
    # b1, b2, b3 at consecutive rounds: b3 carries b2's certificate, so b1 is provably committed.
    actions = core.on_message(1, RangeResponse((b1, b2, b3), None), 0.0)
    commits = [a for a in actions if isinstance(a, CommitBlocks)]
    assert commits and [b.id for b in commits[0].blocks] == [b1.id]


def test_a_backlog_of_large_transactions_is_split_across_blocks_that_fit():
    c = Cluster()
    c.start()
    big = [bytes([k % 256]) * 12_000 + k.to_bytes(4, "big") for k in range(700)]  # ~8.4 MB in all
    logs = []
    original = c.apply

    def spy(i, actions):
        logs.extend(a for a in actions if getattr(a, "event", "") == "proposal.invalid")
        original(i, actions)

    c.apply = spy
    for i, core in enumerate(c.cores):
        c.apply(i, core.submit(big, c.now))
    c.run(until=60.0, max_steps=50_000, done=lambda: max(x.pending_tx_count for x in c.cores) == 0)
    assert logs == []
    assert all(core.pending_tx_count == 0 for core in c.cores)
    store = c.blocks[0]
    sizes = [sum(map(len, store.block_at(h).payload)) for h in range(1, store.committed_height() + 1)]
    assert max(sizes) <= 4 * 1024 * 1024 and sum(sizes) == sum(map(len, big))


def test_a_reconnecting_peer_is_sent_the_current_rounds_proposal_vote_and_timeout():
    c = Cluster()
    c.start()
    leader = c.cores[0].vset.leader(c.cores[0].round)
    core = c.cores[leader]
    # Round 1: the leader has proposed (and voted for its own block).
    resent = core.on_peer_connected((leader + 1) % 4, 0.0)
    proposals = [a for a in resent if isinstance(a, Send) and isinstance(a.message, Proposal)]
    assert proposals and proposals[0].message.block.round == core.round
    next_leader = core.vset.leader(core.round + 1)
    if next_leader != leader:
        votes = [a for a in core.on_peer_connected(next_leader, 0.0)
                 if isinstance(a, Send) and isinstance(a.message, VoteMsg)]
        assert votes and votes[0].message.vote.round == core.round
    # Once timed out of the round, the timeout is sent along too.
    c.apply(leader, core.tick(core.pacemaker.deadline))
    timeouts = [a for a in core.on_peer_connected((leader + 2) % 4, core.pacemaker.deadline)
                if isinstance(a, Send) and isinstance(a.message, TimeoutMsg)]
    assert timeouts and timeouts[0].message.timeout.round == core.round


def test_a_sync_answer_of_large_blocks_stays_within_one_frame():
    c = Cluster()
    f, core = c.f, c.cores[0]
    qc, blocks = f.genesis_qc, []
    for r in range(1, 5):
        block = f.block(r, qc, payload=tuple(bytes([r, k]) * 30_000 for k in range(50)))  # ~3 MB each
        blocks.append(block)
        qc = f.qc(block)
        core.tree.insert(block)
    answer = [a for a in core.on_message(1, SyncRequest(blocks[-1].id, 64), 0.0) if isinstance(a, Send)]
    sent = answer[0].message.blocks
    assert 1 <= len(sent) < 4 and sent[0].id == blocks[-1].id
    assert len(encode_message(answer[0].message)) < 8 * 1024 * 1024


def _trickle(c, ks):
    """Submit transaction ``tx-k`` for each k, 10 ms apart, until all commit; the committed blocks
    that carry transactions, and the milliseconds between them."""
    for k in ks:
        for i, core in enumerate(c.cores):
            c.apply(i, core.submit([b"tx-%d" % k], c.now))
        c.run(until=c.now + 0.01)
        c.now += 0.01
    c.run(until=c.now + 2.0, done=lambda: all(core.pending_tx_count == 0 for core in c.cores))
    store = c.blocks[0]
    loaded = [b for b in (store.block_at(h) for h in range(1, store.committed_height() + 1)) if b.payload]
    return loaded, [b.timestamp - a.timestamp for a, b in pairwise(loaded)]


def test_a_light_stream_below_the_backlog_is_not_paced():
    c = Cluster(config=replace(CONFIG, min_block_interval=0.05, pace_backlog=10, empty_block_delay=0.5))
    c.start()
    loaded, gaps = _trickle(c, range(40))
    assert sum(len(b.payload) for b in loaded) == 40
    assert max(gaps) < 50  # one transaction every 10 ms, each proposed as it came


def test_under_load_blocks_wait_for_the_minimum_interval_unless_full():
    c = Cluster(config=replace(CONFIG, min_block_interval=0.05, empty_block_delay=0.5))
    c.start()
    c.run(until=2.0)  # a quiet chain: empty blocks every half second
    c.run(until=2.2)  # messages delivered; the next leader waits to propose an empty block at 2.5
    c.now = 2.2
    quiet = c.now
    for i, core in enumerate(c.cores):
        c.apply(i, core.submit([b"lone"], c.now))
    c.run(until=c.now + 1.0, done=lambda: any(c.blocks[0].block_at(h).payload
                                              for h in range(1, c.blocks[0].committed_height() + 1)))
    lone = [c.blocks[0].block_at(h) for h in range(1, c.blocks[0].committed_height() + 1)]
    # Proposed at once (not at the next empty-block time), committed after one paced block.
    assert [b.timestamp for b in lone if b.payload] == [int(quiet * 1000)]
    assert c.now - quiet < 0.1

    c = Cluster(config=replace(CONFIG, min_block_interval=0.05))
    c.start()
    # A quiet chain proposes the first transaction at once; the block that commits it waits.
    for i, core in enumerate(c.cores):
        c.apply(i, core.submit([b"tx-0"], c.now))
    c.run(until=0.5, done=lambda: any(c.blocks[0].block_at(h).payload
                                      for h in range(1, c.blocks[0].committed_height() + 1)))
    first = [c.blocks[0].block_at(h) for h in range(1, c.blocks[0].committed_height() + 1)]
    assert [(b.payload, b.timestamp) for b in first if b.payload] == [((b"tx-0",), 0)]
    assert 0.05 <= c.now < 0.1
    # Then a steady trickle: blocks carrying transactions come at least 50 ms apart.
    loaded, gaps = _trickle(c, range(1, 40))
    store = c.blocks[0]
    assert sum(len(b.payload) for b in loaded) == 40
    assert gaps and min(gaps) >= 49  # milliseconds, truncated
    # A full block's worth (max_block_txs) goes out without waiting.
    before = store.committed_height()
    full = [b"full-%d" % k for k in range(CONFIG.max_block_txs)]
    for i, core in enumerate(c.cores):
        c.apply(i, core.submit(full, c.now))
    start = c.now
    c.run(until=c.now + 0.001, done=lambda: store.committed_height() > before and any(
        store.block_at(h).payload[:1] == (full[0],) for h in range(before + 1, store.committed_height() + 1)))
    assert c.now - start < 0.001


def test_no_vote_for_a_block_timed_before_its_parent_or_past_the_allowed_drift():
    from ehrnode.consensus.core import Log
    from ehrnode.consensus.types import Block

    f = Factory(4)
    voter = next(i for i in range(4) if i not in (f.vset.leader(1), f.vset.leader(2)))
    core = ConsensusCore(f.vset, voter, f.identities[voter], MemorySafetyStore(),
                         config=replace(CONFIG, max_proposals_per_round=3))
    core.start(0.0)

    def proposal(round_, qc, timestamp):
        author = f.vset.leader(round_)
        return Proposal(Block.propose(epoch=0, round=round_, qc=qc, author=author, timestamp=timestamp, payload=(),
                                      identity=f.identities[author], chain_id=f.vset.chain_id))

    def voted(actions):
        return any(isinstance(a, Send) and isinstance(a.message, VoteMsg) for a in actions)

    def refusal(actions):
        return [a.fields["reason"] for a in actions if isinstance(a, Log) and a.event == "vote.refused"]

    now = 100.0
    ahead = proposal(1, f.genesis_qc, int((now + CONFIG.max_clock_drift + 5) * 1000))
    actions = core.on_message(f.vset.leader(1), ahead, now)
    assert not voted(actions) and refusal(actions) == ["time_in_future"]
    # Backdated past the drift: no vote either.
    behind = proposal(1, f.genesis_qc, int((now - CONFIG.max_clock_drift - 5) * 1000))
    actions = core.on_message(f.vset.leader(1), behind, now)
    assert not voted(actions) and refusal(actions) == ["time_in_past"]
    # The same round's block at a sane time is voted for (a second proposal in the round).
    b1 = proposal(1, f.genesis_qc, int(now * 1000))
    assert voted(core.on_message(f.vset.leader(1), b1, now))
    # Its child stamped before it: no vote.
    early = proposal(2, f.qc(b1.block), int(now * 1000) - 1)
    actions = core.on_message(f.vset.leader(2), early, now)
    assert not voted(actions) and refusal(actions) == ["time_before_parent"]
