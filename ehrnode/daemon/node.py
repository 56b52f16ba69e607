"""One ehrnode daemon: stores, consensus, peers and the local API in one trio nursery.

Theory of operation
-------------------
:class:`Node` opens everything a member needs from its ``node.toml``: keys,
genesis, the safety data, the block store and the ledger state (replaying any
committed block the state had not applied before a crash), the mempool, and
the consensus core recovered from the block store.

One task, the *driver*, owns the consensus core: inputs (consensus messages
from peers, transactions from peers or local clients, the timer) arrive in two
bounded inboxes and are fed to the core one at a time, consensus messages
first, so a burst of transactions never delays a vote. The driver carries out
the actions the core returns (send through the peer network, persist, commit,
re-arm the timer). Peer connections and API clients never touch the core
directly, as in the simulator. Locally submitted transactions are gossiped to
every peer in batches every few milliseconds.

A committed block is written to the block store, applied to the ledger state,
removed from the mempool, and announced to API subscribers and to callers
waiting for one of its transactions.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from .. import crypto, metrics
from ..config import Genesis, Member, NodeConfig, load_genesis
from ..consensus.core import (
    Action,
    Broadcast,
    CommitBlocks,
    ConsensusCore,
    CoreConfig,
    Log,
    PersistBlock,
    Send,
    SetTimer,
    epoch_of,
)
from ..consensus.messages import decode_message, encode_message
from ..consensus.pacemaker import PacemakerConfig
from ..consensus.safety import SafetyData
from ..consensus.survey import RoundSurvey, encode_answer
from ..consensus.types import Block, EpochEnd, ValidatorSet
from ..consortium import install_consortium_key
from ..epochs import EpochGrant, EpochKeys
from ..errors import AdmissionError, CodecError, ConfigError, CryptoError, InvalidMessage, KeyUnavailable, StoreError
from ..ledger.block_store import SqliteBlockStore
from ..ledger.envelope import mix
from ..ledger.mempool import Mempool
from ..ledger.safety_store import FileSafetyStore
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction
from ..limits import Refusals
from ..logs import get_logger
from ..membership import Membership
from ..metrics import Registry
from ..net.peers import Peer, PeerNetwork
from ..net.protocol import (
    AnswerFrame,
    ConsensusFrame,
    Frame,
    PullFrame,
    RoundAnswerFrame,
    RoundQueryFrame,
    TxFrame,
    encode_frame,
)
from ..net.tls import TlsContexts, check_certificate
from ..records.service import Hooks, RecordsService, anchor_view
from ..sdnotify import Notifier
from ..sharing.events import Subscription
from ..sharing.messages import PullAnswer, request_id
from ..sharing.owner import OwnerHooks, PullServer
from ..sharing.policy import load_policy
from ..sharing.requester import Puller, RequesterHooks
from ..sharing.whois import WhoisDesk, WhoisHooks
from ..users.store import UserStore
from .commits import BlockFeed, Commits, EventFeed, TxWaiters

#: A server the node starts before it reports ready (``nursery.start``-able: it takes ``task_status``).
Listener = Callable[..., Awaitable[Any]]
CONSENSUS_INBOX = 10_000
#: Messages of a later consensus epoch kept for when this node gets there.
AHEAD_KEPT = 256
TX_INBOX = 100_000
MAX_TX_BATCH = 1000
#: Gossiped transactions admitted per turn of the driver: each costs a signature check
#: (~0.2 ms), so a turn stays short and consensus messages never wait long behind them.
TXS_PER_TURN = 64
GOSSIP_INTERVAL = 0.005
#: Seconds between asking again, after a restore, the validators that have not answered.
SURVEY_RETRY = 2.0
#: Event subscriptions open at once (``events.subscribe``, ``ehrnode watch``).
MAX_EVENT_SUBSCRIBERS = 256
#: After a start, how long to let the chain catch up before answering whois requests left open.
WHOIS_CATCH_UP = 10.0
#: A gossip frame's transactions, in bytes (well inside the 8 MiB frame limit).
GOSSIP_FRAME_BYTES = 2 * 1024 * 1024
#: After a membership change, how long the member whose turn it is has to rotate the epoch key
#: before any member does.
MEMBERSHIP_ROTATION_GRACE = 20.0
DEFAULT_CORE = CoreConfig(
    pacemaker=PacemakerConfig(base_timeout=2.0, backoff=1.5, max_timeout=30.0, resend_interval=1.0),
    max_block_txs=1000,
    # An idle chain makes an empty block every half second rather than spinning.
    empty_block_delay=0.5,
    # Under load, blocks at most every 50 ms (unless full): per-block work is shared by more
    # transactions (saturation with 256-byte notes on 2 cores: 575 tx/s without, 773 with). A
    # quiet chain proposes at once; a lone transaction can commit up to 50 ms later.
    min_block_interval=0.05,
)


class Node:
    def __init__(self, config: NodeConfig, *, core_config: CoreConfig = DEFAULT_CORE) -> None:
        self.config = config
        self.genesis: Genesis = load_genesis(config.genesis_path)
        self.name = config.name
        try:
            #: The member's keys, shared by everything that signs or opens for it.
            self.keys = crypto.MemberKeys(crypto.Identity.load(config.signing_key_path),
                                          crypto.SealingKey.load(config.sealing_key_path))
        except CryptoError as exc:
            raise ConfigError(str(exc)) from exc
        self.epoch_keys = EpochKeys(self.genesis.chain_id, self.name, self.sealing_key)
        # Replacement keys from `consortium new-keys`, taken once a rotate-key proposal lists them.
        following = _next_keys(config)
        if following is not None:
            self.epoch_keys.add_sealing_key(following[1])
        # A founding member's copy of the first key is in genesis; one that joined later, or whose
        # keys were replaced since, has it re-sealed on the chain. Whether this node's keys are the
        # member's is checked against the membership below.
        if self.genesis.epoch_key is None:
            raise ConfigError(f"{config.genesis_path}: no epoch key")
        self.epoch_keys.learn(self.genesis.epoch_key)
        self.log = get_logger(node=self.name)

        data = config.data_dir
        try:
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {data}: {exc.strerror}") from exc
        self.users = UserStore(data, self.name)
        admin, adopted = self.users.ensure_admin()
        if adopted:
            self.log.warning("users.admin_credential_adopted", user=admin.name,
                             detail="api.token was replaced by hand; it is now the admin's credential")
        self.block_store = SqliteBlockStore(data / "blocks.sqlite3", self.genesis.validators)
        self.state = LedgerState(data / "state.sqlite3", self.genesis.chain_id, Membership(0, 0, self.genesis.members),
                                 keys=self.epoch_keys)
        #: The height at which this member found it lacks an epoch key: the ledger state stops there.
        self.state_stalled: int | None = None
        self._keys_held = len(self.epoch_keys.epochs)
        self._rotation_wake = trio.Event()  # a membership change or a stall: key upkeep is due at once
        self._key_requests: set[int] = set()  # epochs whose key this member asked to be sealed again
        self._replay_state()
        #: The consensus epoch's validators, and its members in the same order.
        self.vset, self.membership = self._validators()
        member = self.membership.get(self.name)
        listed = None if member is None else (member.signing_key, member.sealing_key)
        if following is not None and listed == (following[0].public_key, following[1].public_key):
            self.keys.replace(*following)
            retired = _take_next_keys(config)
            self.log.warning("keys.replaced", retired=[str(p) for p in retired],
                             detail="the consortium adopted this member's new keys: they are its keys now")
        elif listed is not None and listed != (self.identity.public_key, self.sealing_key.public_key):
            raise ConfigError(f"{config.signing_key_path} and {config.sealing_key_path} are not the keys the "
                              f"consortium lists for {self.name}")
        self.index = self.membership.index_of(self.name)
        if member is None:
            self.log.warning("membership.not_member", epoch=self.membership.epoch, former=self.state.governance.former(
                self.name), detail="not a member as far as this node's chain goes: it follows the chain, and takes "
                                   "part once a proposal that admits it is adopted")
        self.mempool = Mempool(self.genesis.chain_id, self.membership.signing_keys, opener=self.state.open_envelope,
                               is_committed=self.state.is_committed)
        safety_store = FileSafetyStore(data / "safety.cbor")
        if safety_store.load() is None and self.block_store.committed_height() > 0:
            # Blocks but no record of what this validator signed (lost, or an interrupted restore):
            # fresh safety data could sign a second vote in a round it voted in. Treat it as restored.
            self.log.warning("safety.missing", height=self.block_store.committed_height())
            safety_store.save(SafetyData(epoch=self.vset.epoch, restored=True))
        self.core = ConsensusCore(
            self.vset, self.index, self.identity, safety_store,
            config=dataclasses.replace(core_config, order_payload=mix),
            recovery=self.block_store.recovery(), committed_lookup=self.block_store.get_block,
            committed_at=self.block_store.block_at, epoch_end=self.block_store.epoch_end,
        )
        tls = config.tls
        self.tls = TlsContexts.load(tls.ca, tls.cert, tls.key, api=tls.api) if tls else None
        if tls:
            expires = check_certificate(tls.cert, tls.ca, self.name)
            if expires - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=30):
                self.log.warning("tls.expiring", expires=expires.isoformat())
        #: Every per-peer and per-source limit counts and logs its refusals here.
        self.refusals = Refusals(self.name)
        self.network = PeerNetwork(self.genesis, self.name, self.identity, self._on_frame,
                                   on_connect=self._on_connect, tls=self.tls, membership=self.membership,
                                   refusals=self.refusals)
        if following is not None and self.identity is not following[0]:
            self.network.fallback = following[0]  # peers that adopted our next key accept only it
        # Restored from a backup: sign nothing until the other validators say how far the chain got.
        self.survey: RoundSurvey | None = None
        if self.core.safety.data.restored and self.index is not None:
            self.survey = RoundSurvey.fresh(self.vset, self.index)
            self.log.warning("restore.waiting", needed=self.survey.needed,
                             detail="restored from a backup: signing resumes once 2f+1 other validators have "
                                    "reported their highest certificates")
        # Two inboxes: consensus messages are always handled before transactions, so a burst of
        # gossip never delays a vote. Both are bounded.
        self._consensus_in: deque[tuple[Peer, bytes]] = deque()
        # Messages of a later consensus epoch (the newest kept).
        self._ahead: deque[tuple[Peer, bytes]] = deque(maxlen=AHEAD_KEPT)
        self._txs_in: deque[tuple[Peer | None, bytes]] = deque()
        self._wake = trio.Event()
        self._gossip_out: list[bytes] = []
        self._connected: list[str] = []  # peers that (re)connected since the driver last looked
        self._gossip_wake = trio.Event()
        self._deadline = float("inf")
        # What follows each commit besides the ledger, in this order (see daemon/commits.py).
        self.waiters = TxWaiters(self.state.tx_height)
        self.block_feed = BlockFeed()
        self.events = EventFeed(self.name, self.state, self.log, limit=MAX_EVENT_SUBSCRIBERS)
        self.commits = Commits(self.log)
        self.commits.subscribe_each("keys.answer_failed", lambda tx: tx.kind == "keys.request",
                                    self._answer_key_request)
        self.commits.subscribe_each(  # whois requests addressed to this institution, answered as they commit
            "whois.answer_failed", lambda tx: tx.kind == "whois.request" and tx.body["institution"] == self.name,
            lambda tx: self.whois.answer(tx.id))
        self.commits.subscribe("events.failed", self.events.committed)
        self.commits.subscribe("commit.waiters_failed", self.waiters.committed)
        self.commits.subscribe("commit.feed_failed", self.block_feed.committed)
        self.inbox_dropped = 0
        self.invalid_messages = 0
        self._started = False  # the core has loaded its certificates (the driver started it)
        self._membership_changed = time.time()
        self._closed = False
        self.notifier = Notifier()
        self.metrics = self._register_metrics()
        self.head: Block = self.block_store.block_at(self.block_store.committed_height()) or self.vset.genesis_block
        # Institutions record; a regulator (or a node set up without records keys) only reads the chain.
        self.records: RecordsService | None = None
        self.pull_server: PullServer | None = None
        self._nursery: trio.Nursery | None = None
        # A member not admitted yet sets up as what its keys say it will be (only institutions hold
        # the consortium key).
        role = member.role if member is not None else (
            "institution" if config.consortium_key_path else "regulator")
        policy = load_policy(config.access_policy_path) if role == "institution" else None
        if role == "institution" and install_consortium_key(config, self.genesis, self.sealing_key):
            self.log.info("keys.consortium_key_installed", path=str(config.consortium_key_path),
                          detail="opened this institution's sealed copy of the EMPI key from genesis")
        if policy is not None and config.master_key_path and config.consortium_key_path:
            self.records = RecordsService(config, chain_id=self.genesis.chain_id, member=self.keys, hooks=Hooks(
                submit=self.submit_own, pending=lambda tx_id: tx_id in self.mempool, state=self.state,
            ))
            self.pull_server = PullServer(
                name=self.name, genesis=self.genesis, state=self.state, records=self.records, policy=policy,
                hooks=OwnerHooks(submit=self.submit, wait_committed=self.wait_committed,
                                 send=self._send_answer, counters=self._count_pull), refusals=self.refusals)
        self.puller = Puller(
            name=self.name, genesis=self.genesis, member=self.keys,
            state=self.state, hooks=RequesterHooks(
                send=lambda owner, data: self.network.send(owner, encode_frame(PullFrame(data))),
                submit=self.submit, wait_committed=self.wait_committed, counters=self._count_pull))
        self.whois = WhoisDesk(name=self.name, genesis=self.genesis, member=self.keys, state=self.state,
                               users=self.users, policy=policy,
                               hooks=WhoisHooks(submit=self.submit, wait_committed=self.wait_committed))

    @property
    def identity(self) -> crypto.Identity:
        return self.keys.identity

    @property
    def sealing_key(self) -> crypto.SealingKey:
        return self.keys.sealing_key

    async def _answer_pending_whois(self) -> None:
        """Answer whois requests made while this node was down, once it has had time to catch up
        (answers committed since are found on the chain, and not given twice)."""
        await trio.sleep(WHOIS_CATCH_UP)
        try:
            for request in self.whois.pending():
                self.whois.answer(request)
        except Exception as exc:  # noqa: BLE001 - an answer must never stop the node
            self.log.error("whois.answer_failed", error=repr(exc))

    def _register_metrics(self) -> Registry:
        r = Registry()
        r.gauge("ehrnode_height", "Height of the last committed block.", lambda: self.head.height)
        r.gauge("ehrnode_round", "Current consensus round.", lambda: self.core.round)
        r.gauge("ehrnode_peers_connected", "Authenticated peer connections.", lambda: len(self.network.peers))
        r.gauge("ehrnode_validators", "Validators in the consortium.", lambda: self.vset.n)
        r.gauge("ehrnode_mempool_transactions", "Transactions admitted and not yet committed.",
                lambda: len(self.mempool))
        r.gauge("ehrnode_sync_behind_blocks", "How far the commit this node is catching up to is above its head.",
                lambda: self.core.sync_gap)
        self.m_commits = r.counter("ehrnode_blocks_committed_total", "Blocks committed by this node.")
        self.m_txs = r.counter("ehrnode_transactions_committed_total", "Valid transactions committed.")
        self.m_invalid_txs = r.counter("ehrnode_transactions_invalid_total",
                                       "Committed transactions the ledger recorded as invalid.")
        self.m_auth_denied = r.counter("ehrnode_auth_denied_total",
                                       "Local API connections and calls refused: bad credential, throttled, "
                                       "revoked or not allowed by the user's role.")
        self.m_timeouts = r.counter("ehrnode_round_timeouts_total", "Rounds this node timed out of.")
        self.m_invalid = r.counter("ehrnode_invalid_messages_total",
                                   "Consensus messages refused (sender disconnected).")
        r.counted("ehrnode_inbox_dropped_total", "Inbound messages dropped because the node was overloaded.",
                  lambda: self.inbox_dropped)
        r.counted("ehrnode_peer_frames_dropped_total", "Outbound frames dropped on full peer queues.",
                  lambda: sum(p.dropped for p in self.network.peers.values()) + self.network.dropped_closed)
        r.counted("ehrnode_peers_rejected_total", "Connections refused at the handshake.",
                  lambda: self.network.rejected)
        r.counted("ehrnode_events_dropped_total", "Events a slow events.subscribe client did not read in time.",
                  lambda: self.events.dropped)
        r.labeled_counts("ehrnode_limited_total", "Requests refused by a per-peer or per-source limit, by limit.",
                         "limit", lambda: self.refusals.counts)
        self.m_pulls = {outcome: r.counter(
            "ehrnode_integrity_alarms_total" if outcome == "integrity" else f"ehrnode_pulls_{outcome}_total", text)
            for outcome, text in (
            ("served", "Pulls of this institution's records served (access logged first)."),
            ("refused", "Pulls refused by policy or consent (as owner), or answered with a refusal (as requester)."),
            ("rejected", "Pull requests rejected as not authentic: bad signature, stale, replayed, malformed, busy."),
            ("unavailable", "Pulls this owner could not decide or serve (access log not committed, vault failure)."),
            ("verified", "Records this node pulled and verified against their anchors."),
            ("failed", "Pulls by this node that failed: unreachable, timeout, unlogged or unreadable answers."),
            ("integrity", "Records served to this node that did not match their anchors (alarms raised)."),
        )}
        self.m_latency = r.histogram(
            "ehrnode_commit_latency_seconds", "From a block's proposal time to its commit at this node.",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        return r

    def _replay_state(self) -> None:
        # The ledger state is applied after the block store commits; after a crash between the
        # two, the committed blocks the state has not seen are applied now: the public part of
        # each (membership, epoch keys), then the rest as far as this member holds the keys.
        for height in range(self.state.public_height + 1, self.block_store.committed_height() + 1):
            block = self.block_store.block_at(height)
            assert block is not None
            self.state.apply_public(block)
        self._catch_up_state()

    def _catch_up_state(self) -> None:
        """Apply the committed blocks the ledger has not (after a start, or once a key that
        stalled it arrives); stops again at a block it still lacks a key for."""
        stalled, self.state_stalled = self.state_stalled, None
        for height in range(self.state.applied_height + 1, self.block_store.committed_height() + 1):
            block = self.block_store.block_at(height)
            assert block is not None
            if self._apply_state(block, None) is None:
                return
        if stalled is not None:
            self.log.warning("ledger.resumed", stalled_at=stalled, height=self.state.applied_height)

    def _validators(self) -> tuple[ValidatorSet, Membership]:
        """The validator set (and membership) of the consensus epoch this node's blocks are in:
        genesis's, then each adopted change's, rooted at the block that adopted it."""
        memberships = self.state.governance.memberships
        vset, membership = self.genesis.validators, memberships[0]
        for following in memberships[1:]:
            start = self.block_store.block_at(following.starts - 1)
            if start is None:
                break  # adopted in a block the ledger saw before a crash and the block store did not
            vset, membership = vset.successor(start, following.keys), following
        return vset, membership

    def _apply_state(self, block: Block, admitted: Any) -> list[Transaction] | None:
        """Apply a committed block to the ledger state; None once this member lacks an epoch key.

        Judging an envelope it cannot open differently from the other members would make
        its state diverge from theirs; it stops instead, says so, and keeps storing blocks
        (a restart tries again from there).
        """
        if self.state_stalled is not None:
            return None
        if block.height <= self.state.applied_height:
            return []  # after a power cut the state can be ahead of the block store
        try:
            return self.state.apply(block, admitted)
        except KeyUnavailable as exc:
            self.state_stalled = block.height
            self.log.error("ledger.stalled", height=block.height, error=str(exc),
                           detail="this member cannot read an epoch the chain uses; the ledger stops here "
                                  "until it holds that key, which it asks the other members to seal to it again "
                                  "(see docs/security.md)")
            self._rotation_wake.set()
            return None

    # --- inputs -----------------------------------------------------------------------

    def _on_frame(self, peer: Peer, frame: Frame) -> None:
        """Called by a peer connection's reader; never blocks."""
        if isinstance(frame, ConsensusFrame):
            if len(self._consensus_in) >= CONSENSUS_INBOX:
                self.inbox_dropped += 1  # overloaded: consensus re-sends what it needs
                return
            self._consensus_in.append((peer, frame.data))
        elif isinstance(frame, TxFrame):
            room = TX_INBOX - len(self._txs_in)
            if room < len(frame.txs):
                self.inbox_dropped += len(frame.txs) - max(room, 0)
            self._txs_in.extend((peer, tx) for tx in frame.txs[:max(room, 0)])
        elif isinstance(frame, PullFrame):
            self._on_pull(peer, frame.data)
            return
        elif isinstance(frame, AnswerFrame):
            self.puller.on_answer(peer.name, frame.data)
            return
        elif isinstance(frame, RoundQueryFrame):
            # Only certificates this node really holds: not before its core has loaded them, and
            # not while it is itself restored (its stores may be old).
            if self._started and self.survey is None:
                self.network.send(peer.name, encode_frame(RoundAnswerFrame(
                    encode_answer(frame.nonce, self.core.high_qc, self.core.high_tc))))
            return
        elif isinstance(frame, RoundAnswerFrame):
            self._on_round_answer(peer, frame.data)
            return
        self._wake.set()

    def _count_pull(self, outcome: str) -> None:
        self.m_pulls[outcome].inc()

    def _send_answer(self, peer: str, data: bytes) -> bool:
        return self.network.send(peer, encode_frame(AnswerFrame(data)), bulk=True)

    def _on_pull(self, peer: Peer, data: bytes) -> None:
        server = self.pull_server
        if server is None or self._nursery is None:
            self._count_pull("rejected")
            self._send_answer(peer.name, PullAnswer(request_id(data), "rejected", "not_owner",
                                                    f"{self.name} holds no records").encode())
        elif limit := server.busy(peer.name):
            server.reject_busy(peer.name, data, limit)
        else:
            self._nursery.start_soon(server.handle, peer.name, data)

    def _on_connect(self, name: str) -> None:
        self._connected.append(name)
        if self.survey is not None:
            self.network.send(name, encode_frame(RoundQueryFrame(self.survey.nonce)))
        self._wake.set()

    def _on_round_answer(self, peer: Peer, data: bytes) -> None:
        survey = self.survey
        if survey is None:
            return  # not restoring (a late answer)
        sender = self.membership.index_of(peer.name)
        if sender is None:
            return
        try:
            survey.add(sender, data)
        except InvalidMessage as exc:
            self.log.warning("restore.bad_answer", peer=peer.name, reason=exc.reason, error=str(exc))
            return
        result = survey.result()
        if result is None:
            return
        floor = self.core.safety.lift_restore(*result)
        self.survey = None
        self.log.warning("restore.resumed", floor=floor, answered=[self.membership.members[i].name
                                                                  for i in sorted(survey.answers)])
        self._apply(self.core.learn_certificates(*result, time.time()))

    async def _ask_rounds(self) -> None:
        """While restored, ask again every few seconds the validators that have not answered."""
        while self.survey is not None:
            await trio.sleep(SURVEY_RETRY)
            survey = self.survey
            if survey is None:
                return
            for name in self.network.connected():
                if self.membership.index_of(name) not in survey.answers:
                    self.network.send(name, encode_frame(RoundQueryFrame(survey.nonce)))

    def rotate_epoch_key(self, actor: bytes = b"") -> Transaction:
        """Open the next epoch: a fresh key sealed to every current member (raises AdmissionError)."""
        grant = EpochGrant.create(self.genesis.chain_id, self.state.latest_epoch + 1,
                                  self.state.membership.sealing_keys)
        tx = self.submit("keys.epoch", grant.body(), actor)
        self.log.info("keys.rotating", epoch=grant.epoch, tx=tx.id.hex()[:16])
        return tx

    def epoch_view(self) -> dict[str, Any]:
        """The epochs of the chain and which of their keys this member holds."""
        return {
            "current": self.state.current_epoch, "rotate_days": self.config.rotate_days,
            "epochs": [{**e, "tx_id": e["tx_id"].hex() if e["tx_id"] else None, "held": e["epoch"] in self.epoch_keys}
                       for e in self.state.epochs()],
            "unreadable": {str(epoch): why for epoch, why in self.epoch_keys.unreadable.items()},
        }

    async def _rotate_on_schedule(self) -> None:
        """Rotate the epoch key once it is ``rotate_days`` old, or at once when the membership
        changed since it was sealed, if it is this member's turn.

        The turn goes round the members by epoch number; if the member whose turn it is
        has not rotated half an interval later (after a membership change:
        ``MEMBERSHIP_ROTATION_GRACE`` later), any member does. The first grant committed
        opens the epoch; a second one for the same epoch is refused as stale.
        """
        interval = self.config.rotate_days * 86400
        asked: tuple[int, bytes] | None = None  # (epoch rotated out of, its grant's transaction)
        while True:
            with trio.move_on_after(min(60.0, interval / 10)):
                await self._rotation_wake.wait()
            self._rotation_wake = trio.Event()
            membership, epochs = self.state.membership, self.state.epochs()
            if self.state_stalled is not None and self.name in membership:
                self._request_key(self.state.epoch_at(self.state_stalled))
            if not epochs or self.state_stalled is not None or self.name not in membership:
                continue
            latest = epochs[-1]
            names = sorted(membership.names)
            turn = names[latest["epoch"] % len(names)] == self.name
            if self.state.grant_recipients(latest["epoch"]) != set(names):
                # Sealed to members that are no longer the membership: a departed member still
                # holds this key, a new one is not sealed the next.
                due = turn or time.time() - self._membership_changed >= MEMBERSHIP_ROTATION_GRACE
            else:
                age = time.time() - latest["time"] / 1000
                due = (turn and age >= interval) or age >= interval * 1.5
            if asked is not None and asked[0] == latest["epoch"] and not (
                    self.state.tx_status(asked[1]) or "").startswith("invalid"):
                continue  # asked already, and not refused
            if due:
                try:
                    asked = (latest["epoch"], self.rotate_epoch_key().id)
                except AdmissionError as exc:
                    self.log.warning("keys.rotation_refused", reason=exc.reason, error=str(exc))

    def _request_key(self, epoch: int) -> None:
        """Ask the members to seal ``epoch``'s key to this member again (once per start)."""
        if epoch in self._key_requests or epoch in self.epoch_keys:
            return
        try:
            tx = self.submit("keys.request", {"epoch": epoch})
        except AdmissionError as exc:
            self.log.warning("keys.request_refused", epoch=epoch, reason=exc.reason, error=str(exc))
            return
        self._key_requests.add(epoch)
        self.log.warning("keys.requested", epoch=epoch, tx=tx.id.hex()[:16])

    def _answer_key_request(self, tx: Transaction) -> None:
        """Another member cannot open its copy of an epoch's key: seal this member's to it.

        Every member that holds the key answers; the requester takes the first copy that opens
        to the key the epoch's check value commits to, so a wrong copy from one member costs
        nothing."""
        member = self.state.membership.get(tx.submitter)
        if tx.submitter == self.name or member is None:
            return
        sealed = self.epoch_keys.reseal(tx.body["epoch"], member.sealing_key)
        if sealed is None:
            return
        try:
            self.submit("keys.reseal", {"epoch": tx.body["epoch"], "member": member.name, "sealed": sealed})
        except AdmissionError as exc:
            self.log.warning("keys.reseal_refused", member=member.name, reason=exc.reason, error=str(exc))
            return
        self.log.info("keys.resealed", epoch=tx.body["epoch"], member=member.name)

    # --- governance ---------------------------------------------------------------------

    def propose(self, change: str, name: str, *, reason: str, member: Member | None = None,
                actor: bytes = b"") -> Transaction:
        """Propose a change of membership (raises AdmissionError, SchemaError).

        ``member`` (add, rotate-key): the member's role, keys and address; this node seals it
        the key of every epoch so far, so it can read the chain from genesis.
        """
        body: dict[str, Any] = {"change": change, "name": name, "reason": reason}
        if change != "remove":
            if member is None:
                raise AdmissionError(f"{change} needs the member's keys and address", reason="no_member")
            try:
                history = self.epoch_keys.history_for(member.sealing_key, self.state.latest_epoch + 1)
            except CryptoError as exc:
                raise AdmissionError(str(exc), reason="no_key") from exc
            body.update(signing_key=member.signing_key, sealing_key=member.sealing_key,
                        address=str(member.address), history=history)
            if change == "add":
                body["role"] = member.role
        tx = self.submit("consortium.propose", body, actor)
        self.log.warning("consortium.proposed", change=change, member=name, tx=tx.id.hex()[:16])
        return tx

    def vote(self, proposal: bytes, actor: bytes = b"") -> Transaction:
        """Vote for an open proposal (raises AdmissionError)."""
        if self.state.governance.proposal_body(proposal) is None:
            raise AdmissionError(f"no proposal {proposal.hex()} on the chain", reason="unknown_proposal")
        tx = self.submit("consortium.vote", {"proposal": proposal}, actor)
        self.log.warning("consortium.voted", proposal=proposal.hex()[:16], tx=tx.id.hex()[:16])
        return tx

    def members_view(self) -> dict[str, Any]:
        """The consortium's members now, and the consensus epoch this node runs."""
        membership = self.state.membership
        return {
            "epoch": membership.epoch, "starts": membership.starts, "quorum": membership.quorum,
            "running_epoch": self.vset.epoch,
            "members": [{"name": m.name, "role": m.role, "address": str(m.address), "index": i,
                         "signing_key": m.signing_key.hex(), "sealing_key": m.sealing_key.hex()}
                        for i, m in enumerate(membership)],
        }

    def submit_note(self, text: str, actor: bytes = b"") -> Transaction:
        """Sign a note transaction as this member, admit it and gossip it (raises AdmissionError)."""
        return self.submit("note", {"text": text}, actor)

    def submit(self, kind: str, body: dict[str, Any], actor: bytes = b"") -> Transaction:
        """Sign a transaction of ``kind`` as this member (``actor``: the user's pseudonym), admit and gossip it.

        Raises SchemaError for a body that does not fit the kind, AdmissionError if the
        mempool will not take it.
        """
        tx = Transaction.create(kind, body, chain_id=self.genesis.chain_id, submitter=self.name,
                                identity=self.identity, time_ms=int(time.time() * 1000), actor=actor)
        self.submit_own(tx)
        return tx

    def submit_own(self, tx: Transaction) -> None:
        """Admit and gossip a transaction this node signed (raises AdmissionError)."""
        try:
            envelope = self.state.seal(tx)
        except KeyUnavailable as exc:
            raise AdmissionError(str(exc), reason="no_key") from exc
        self.mempool.admit_own(tx, envelope)
        self._accept_local(envelope.encoded)

    def _accept_local(self, data: bytes) -> None:
        self._gossip_out.append(data)
        self._gossip_wake.set()
        # Already admitted: the driver hands it to consensus without checking it again.
        self._txs_in.append((None, data))
        self._wake.set()

    async def _gossip(self) -> None:
        """Send locally submitted transactions to every peer, batched every few milliseconds."""
        while True:
            await self._gossip_wake.wait()
            self._gossip_wake = trio.Event()
            await trio.sleep(GOSSIP_INTERVAL)
            pending, self._gossip_out = self._gossip_out, []
            batch: list[bytes] = []
            size = 0
            for tx in pending:
                if batch and (len(batch) >= MAX_TX_BATCH or size + len(tx) > GOSSIP_FRAME_BYTES):
                    self.network.broadcast(encode_frame(TxFrame(tuple(batch))), bulk=True)
                    batch, size = [], 0
                batch.append(tx)
                size += len(tx)
            if batch:
                self.network.broadcast(encode_frame(TxFrame(tuple(batch))), bulk=True)

    async def wait_committed(self, tx_id: bytes, timeout: float) -> int | None:
        """The height ``tx_id`` was committed at, or None if not within ``timeout`` seconds."""
        return await self.waiters.wait(tx_id, timeout)

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        return self.block_feed.subscribe()

    def subscribe_events(self, subscription: Subscription) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """A channel of the events ``subscription`` wants (raises AdmissionError past the limit)."""
        return self.events.subscribe(subscription)

    # --- running ----------------------------------------------------------------------

    async def run(self, *, listeners: Sequence[Listener] = (), task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled: its peer listener, then each of ``listeners`` (the local
        API, given by whoever runs the node), then everything else; reports through
        ``task_status`` (and systemd) once every listener is bound."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            peer = self.config.peer_listen
            await nursery.start(self.network.serve, peer.host, peer.port)
            for listener in listeners:
                await nursery.start(listener)
            if self.config.metrics_listen is not None:
                address = self.config.metrics_listen
                await nursery.start(metrics.serve, self.metrics, address.host, address.port)
            nursery.start_soon(self.network.dial_all)
            nursery.start_soon(self._drive)
            nursery.start_soon(self._gossip)
            if self.survey is not None:
                nursery.start_soon(self._ask_rounds)
            if self.records is not None:
                nursery.start_soon(self.records.run_outbox)
            nursery.start_soon(self._answer_pending_whois)
            nursery.start_soon(self._rotate_on_schedule)
            if self.notifier.watchdog_interval is not None:
                nursery.start_soon(self._watchdog)
            self.log.info(
                "node.started", chain=self.genesis.chain_id, height=self.head.height, peer_address=str(peer),
                api_address=str(self.config.api_listen), validators=self.vset.n,
            )
            # Listeners are bound: this is when systemd may consider the service started.
            self.notifier.notify("READY=1", f"STATUS=height {self.head.height}, listening on {peer}")
            task_status.started()

    async def _watchdog(self) -> None:
        # Pinged from the event loop itself: if the loop wedges, the pings stop and systemd
        # restarts the service.
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            self.notifier.notify("WATCHDOG=1", f"STATUS=height {self.head.height}, round {self.core.round}, "
                                               f"{len(self.network.peers)} peers")
            await trio.sleep(interval)

    async def shutdown(self) -> None:
        """Stop dialing and accepting peers and close every connection with 1001."""
        self.notifier.notify("STOPPING=1")
        await self.network.close_all()

    def close(self) -> None:
        """Close the stores; call once no task of :meth:`run` is left."""
        if self._closed:
            return
        self._closed = True
        self.block_store.close()
        self.state.close()
        self.users.close()
        if self.records is not None:
            self.records.close()
        self.log.info("node.stopped", height=self.head.height)

    async def _drive(self) -> None:
        self._apply(self.core.start(time.time()))
        self._started = True
        while True:
            if not self._consensus_in and not self._txs_in and not self._connected:
                with trio.move_on_at(self._deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
            if trio.current_time() >= self._deadline:
                self._apply(self.core.tick(time.time()))
            while self._connected:
                index = self.membership.index_of(self._connected.pop())
                if index is not None:
                    self._apply(self.core.on_peer_connected(index, time.time()))
            # Consensus first, then one batch of transactions, then let other tasks run.
            for _ in range(min(len(self._consensus_in), 512)):
                peer, data = self._consensus_in.popleft()
                self._handle_consensus(peer, data)
            if self._txs_in:
                self._handle_txs()
            await trio.sleep(0)

    def _handle_consensus(self, peer: Peer, data: bytes) -> None:
        sender = self.membership.index_of(peer.name)
        if sender is None:
            # A member this node does not count as a validator yet (it is behind on membership):
            # the validators it does count will make it catch up.
            self.log.debug("consensus.not_validator", peer=peer.name, epoch=self.vset.epoch)
            return
        try:
            message = decode_message(data)
            epoch = epoch_of(message)
            if epoch is not None and epoch > self.vset.epoch:
                # Kept to hand to the next core: a validator behind learns the epoch ended from
                # this very message, and its vote should still count once it has caught up.
                self._ahead.append((peer, data))
            actions = self.core.on_message(sender, message, time.time())
        except (CodecError, InvalidMessage) as exc:
            self.invalid_messages += 1
            self.m_invalid.inc()
            self.log.warning("consensus.invalid_message", peer=peer.name, reason=exc.reason, error=str(exc))
            self.network.kick(peer, exc.reason)
            return
        except StoreError:
            raise  # the disk failed under us: stop rather than run on half-persisted state
        except Exception as exc:  # noqa: BLE001 - a message we did not foresee costs its sender the link
            self.invalid_messages += 1
            self.m_invalid.inc()
            self.log.error("consensus.message_failed", peer=peer.name, error=repr(exc))
            self.network.kick(peer, "internal_error")
            return
        self._apply(actions)

    def _handle_txs(self) -> None:
        accepted = []
        for _ in range(min(len(self._txs_in), TXS_PER_TURN)):
            peer, data = self._txs_in.popleft()
            if peer is None:
                accepted.append(data)  # admitted by submit() already
                continue
            try:
                self.mempool.admit(data)
            except AdmissionError as exc:
                if exc.reason == "member_quota":
                    self.refusals.refuse("mempool_member", peer.name, time.monotonic(), detail=str(exc))
                elif exc.reason != "duplicate":
                    self.log.debug("tx.refused", peer=peer.name, reason=exc.reason)
                continue
            accepted.append(data)
        if accepted:
            self._apply(self.core.submit(accepted, time.time()))

    def _apply(self, actions: Iterable[Action]) -> None:
        core, membership = self.core, self.membership  # the core's own validators, even once its epoch ends
        for action in actions:
            if self.core is not core and not isinstance(action, (Send, Broadcast)):
                # An earlier action ended the epoch. The old core's messages still go out (a
                # proposal carrying the certificate that committed the epoch's last block is how
                # the others learn of it at once); its timers and the rest are void.
                continue
            if isinstance(action, Send):
                name = membership.members[action.to].name
                self.network.send(name, encode_frame(ConsensusFrame(encode_message(action.message))))
            elif isinstance(action, Broadcast):
                self.network.broadcast(encode_frame(ConsensusFrame(encode_message(action.message))))
            elif isinstance(action, SetTimer):
                delay = action.at - time.time()
                self._deadline = trio.current_time() + max(delay, 0.0) if action.at != float("inf") else float("inf")
            elif isinstance(action, PersistBlock):
                self.block_store.put_block(action.block)
            elif isinstance(action, CommitBlocks):
                self._commit(action)
            elif isinstance(action, Log):
                self._log_core(action)

    def _commit(self, action: CommitBlocks) -> None:
        # The public part of each block first: a block that adopts a membership change is the
        # last of its epoch, and what the commit carried after it is kept only to prove it.
        blocks, ended = action.blocks, None
        for i, block in enumerate(blocks):
            self.state.apply_public(block)
            following = self.state.membership_at(block.height + 1)
            if following.epoch > self.vset.epoch and following.starts == block.height + 1:
                blocks, ended = blocks[:i + 1], EpochEnd(block, blocks[i + 1:], action.proof)
                break
        self.block_store.commit(blocks, action.proof, ended)
        for block in blocks:
            applied = self._apply_state(block, self.mempool.get)
            txs = applied or []
            self.m_commits.inc()
            self.m_txs.inc(len(txs))
            if applied is not None:
                self.m_invalid_txs.inc(len(block.payload) - len(txs))
            self.m_latency.observe(max(0.0, time.time() - block.timestamp / 1000))
            self.mempool.remove(crypto.sha256(data) for data in block.payload)
            self.mempool.remove_committed(tx.id for tx in txs)
            self.head = block
            # Empty blocks of an idle chain are not worth an info line each.
            (self.log.info if block.payload else self.log.debug)(
                "block.committed", height=block.height, round=block.round, txs=len(block.payload),
                id=block.id.hex()[:16],
            )
            self.commits.committed(block, txs)
        if self.state_stalled is not None and len(self.epoch_keys.epochs) > self._keys_held:
            self._catch_up_state()  # a key it lacked was sealed to it since
        self._keys_held = len(self.epoch_keys.epochs)
        if ended is not None:
            self._end_epoch(ended)

    def _end_epoch(self, ended: EpochEnd) -> None:
        """The block ``ended.last`` adopted a membership change: run the next epoch with it."""
        before, membership = self.membership, self.state.membership_at(ended.last.height + 1)
        self.vset = self.vset.successor(ended.last, membership.keys)
        self.membership, self.index = membership, membership.index_of(self.name)
        listed = membership.get(self.name)
        if listed is not None and listed.signing_key != self.identity.public_key:
            following = _next_keys(self.config)
            if following is not None and (listed.signing_key, listed.sealing_key) == (
                    following[0].public_key, following[1].public_key):
                self.keys.replace(*following)  # the recorder, vault, pulls and whois sign and open with them now
                self.epoch_keys.add_sealing_key(following[1])  # later epochs' keys are sealed to the new key
                self.network.set_identity(self.identity)
                self.log.warning("keys.replaced", retired=[str(p) for p in _take_next_keys(self.config)],
                                 detail="the consortium adopted this member's new keys: they are its keys now")
            else:
                self.index = None  # re-keyed with keys this node does not hold: it signs nothing more
                self.log.error("membership.keys_replaced", epoch=membership.epoch,
                               detail="the consortium adopted keys for this member that this node does not hold")
        self.core = self.core.successor(self.vset, self.index, self.identity)
        if self.name in membership:
            self.network.set_membership(membership)
        # A removed member keeps its links as they were: a validator still in the old epoch may
        # need it to learn that the epoch ended (its peers refuse it once they have moved on).
        self.mempool.members = membership.signing_keys
        self._membership_changed = time.time()
        added = sorted(set(membership.names) - set(before.names))
        removed = sorted(set(before.names) - set(membership.names))
        self.log.warning("membership.changed", epoch=membership.epoch, height=ended.last.height, added=added,
                         removed=removed, members=membership.names, validator=self.index is not None)
        if self.name in removed:
            self.log.error("membership.removed", epoch=membership.epoch,
                           detail="the consortium removed this member: peers refuse it from now on, and later "
                                  "epoch keys are not sealed to it")
        self._rotation_wake.set()
        self._apply(self.core.start(time.time()))
        ahead, self._ahead = self._ahead, deque(maxlen=AHEAD_KEPT)
        self._consensus_in.extendleft(reversed(ahead))
        self._wake.set()

    def _log_core(self, action: Log) -> None:
        if action.event == "round.timeout":
            self.m_timeouts.inc()
        if action.event == "proposal.invalid":
            self.log.error(action.event, **action.fields)
            return
        if action.event in (
            "round.timeout", "tc.formed", "vote.equivocation", "vote.refused", "timeout.refused", "proposal.refused",
            "sync.started", "sync.finished",
        ):
            self.log.info(action.event, **action.fields)
        else:
            self.log.debug(action.event, **action.fields)

    # --- views --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name, "chain": self.genesis.chain_id, "height": self.head.height, "head": self.head.id.hex(),
            "round": self.core.round, "peers": self.network.connected(), "mempool": len(self.mempool),
            "validators": self.vset.n, "pid": os.getpid(), "epoch": self.state.current_epoch,
            "consensus_epoch": self.vset.epoch, "validator": self.index is not None,
            "ledger": {"applied": self.state.applied_height, "stalled_at": self.state_stalled},
        }

    def records_list(self, empi: str) -> list[dict[str, Any]]:
        """Every committed anchor for ``empi`` across the consortium (any member can answer)."""
        return [anchor_view(a) for a in self.state.anchors(empi=empi)]

    def block_view(self, height: int | None) -> dict[str, Any] | None:
        height = self.head.height if height is None else height
        block = self.block_store.block_at(height)
        if block is None:
            return None
        txs: list[dict[str, Any]] = []
        for data in block.payload:
            try:
                envelope, tx = self.state.open_envelope(data, block.height)
            except (AdmissionError, KeyUnavailable) as exc:
                txs.append({"id": crypto.sha256(data).hex(), "kind": "unreadable", "reason": exc.reason})
            else:
                txs.append({**tx.summary(), "epoch": envelope.epoch, "envelope": envelope.id.hex()})
        view: dict[str, Any] = {
            "height": block.height, "id": block.id.hex(), "parent": block.parent.hex(), "round": block.round,
            "time": block.timestamp, "epoch": block.epoch,
            "author": self.state.governance.of_epoch(block.epoch).members[block.author].name if block.height else None,
            "txs": txs,
        }
        return view


def _next_keys(config: NodeConfig) -> tuple[crypto.Identity, crypto.SealingKey] | None:
    signing, sealing = config.next_key_paths
    if not signing.exists() or not sealing.exists():
        return None
    try:
        return crypto.Identity.load(signing), crypto.SealingKey.load(sealing)
    except CryptoError as exc:
        raise ConfigError(str(exc)) from exc


def _take_next_keys(config: NodeConfig) -> list[Path]:
    """Make the replacement keys the member's keys; the old ones are kept, renamed, and returned."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = []
    for current, following in zip((config.signing_key_path, config.sealing_key_path), config.next_key_paths,
                                  strict=True):
        old = current.with_name(f"{current.stem}.retired-{stamp}{current.suffix}")
        try:
            os.replace(current, old)
            os.replace(following, current)
        except OSError as exc:
            raise ConfigError(f"cannot put the new key {following} in place of {current}: {exc.strerror}") from exc
        retired.append(old)
    return retired
