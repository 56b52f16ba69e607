"""One ehrnode daemon: stores, consensus, peers and the local API in one trio nursery.

Theory of operation
-------------------
:class:`Node` only wires. It opens everything a member needs from its ``node.toml``: keys,
genesis, the safety data, the chain (block store and ledger state, replaying any committed
block the state had not applied before a crash), the mempool and the consensus core recovered
from the block store, and hands each to the object that runs it:

- the *driver* (daemon/driver.py) owns the consensus core and carries out its actions;
- the *chain* (ledger/chain.py) stores and applies what the core commits and answers with what
  changed and whether the consensus epoch ended;
- the *commit subscribers* (daemon/commits.py) act on each committed block: key requests,
  whois answers, event feeds, callers waiting for a transaction, block notifications;
- *key upkeep* (daemon/keys.py) rotates the epoch key and asks for keys this member lacks;
- *restore* (daemon/restore.py) holds signing back after a restore from a backup;
- the records service, the pull server and requester and the whois desk (records/, sharing/).

Peer frames are routed to them by kind; locally submitted transactions are gossiped to every
peer in batches every few milliseconds. When a commit ends the consensus epoch the node builds
the next epoch's core (taking up the member's replacement keys if the consortium adopted them)
and hands it to the driver.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .. import crypto, metrics
from ..config import Genesis, Member, NodeConfig, load_genesis
from ..consensus.core import (
    CommitBlocks,
    ConsensusCore,
    CoreConfig,
)
from ..consensus.pacemaker import PacemakerConfig
from ..consensus.safety import SafetyData
from ..consensus.types import Block, EpochEnd, ValidatorSet
from ..consortium import install_consortium_key
from ..epochs import EpochKeys
from ..errors import AdmissionError, ConfigError, CryptoError, KeyUnavailable
from ..ledger.block_store import SqliteBlockStore
from ..ledger.chain import Chain
from ..ledger.envelope import mix
from ..ledger.mempool import Mempool
from ..ledger.safety_store import FileSafetyStore
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction
from ..limits import Holdings, Refusals
from ..logs import get_logger
from ..membership import Membership
from ..metrics import Registry
from ..net.peers import Peer, PeerNetwork
from ..net.protocol import (
    AnswerFrame,
    ConsensusFrame,
    Frame,
    OprfAnswerFrame,
    OprfRequestFrame,
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
from .driver import Driver
from .keys import KeyUpkeep, adopt_next_keys, next_keys, retired_sealing_keys
from .oprf_keys import OprfKeyUpkeep
from .oprf_service import OprfService
from .restore import Restore

#: A server the node starts before it reports ready (``nursery.start``-able: it takes ``task_status``).
Listener = Callable[..., Awaitable[Any]]
MAX_TX_BATCH = 1000
#: Locally submitted transactions wait this long to be gossiped together (under load the gossip
#: task is behind anyway and sends what piled up; a lone transaction reaches the leader sooner).
GOSSIP_INTERVAL = 0.001
#: Event subscriptions open at once (``events.subscribe``, ``ehrnode watch``).
MAX_EVENT_SUBSCRIBERS = 256
#: After a start, how long to let the chain catch up before answering whois requests left open.
WHOIS_CATCH_UP = 10.0
#: A gossip frame's transactions, in bytes (well inside the 8 MiB frame limit).
GOSSIP_FRAME_BYTES = 2 * 1024 * 1024
#: OPRF requests from one peer being evaluated or waiting to be; more are dropped (and counted as
#: the refusal ``oprf_requests``): one member cannot keep this one's evaluator busy for the others.
MAX_OPRF_REQUESTS_PER_PEER = 8
#: Transactions of this node's own (signed here, not yet committed) past which a client's
#: submission waits for commits (:meth:`Node.wait_room`). A submitter faster than the consortium
#: commits is held to its pace here, instead of piling seconds of backlog into every member's
#: mempool, which each member would open and verify long before a block carries it, and which
#: every other member's transactions would queue behind. At 2,000 tx/s over four members this is
#: about a second of backlog.
OWN_BACKLOG = 500
DEFAULT_CORE = CoreConfig(
    pacemaker=PacemakerConfig(base_timeout=2.0, backoff=1.5, max_timeout=30.0, resend_interval=1.0),
    max_block_txs=1000,
    # An idle chain makes an empty block every half second rather than spinning.
    empty_block_delay=0.5,
    # Under a backlog (100 transactions waiting), blocks at most every 50 ms (unless full): per-block
    # work is shared by more transactions (saturation with 256-byte notes on 2 cores: 575 tx/s
    # without, 773 with). A lighter stream is proposed as it comes.
    min_block_interval=0.05,
    pace_backlog=100,
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
        following = next_keys(config)
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
                                 keys=self.epoch_keys, rules=self.genesis.rules)
        self.chain = Chain(self.block_store, self.state, self.log, on_stall=lambda: self.key_upkeep.wake())
        self.key_upkeep = KeyUpkeep(self.name, config, self.genesis.chain_id, self.chain, self.epoch_keys,
                                    self.submit, self.log)
        self.chain.replay()
        # The consensus epoch's validators, and its members in the same order.
        vset, membership = self._validators()
        member = membership.get(self.name)
        listed = None if member is None else (member.signing_key, member.sealing_key)
        if (not adopt_next_keys(config, self.keys, following, listed, self.log) and listed is not None
                and listed != (self.identity.public_key, self.sealing_key.public_key)):
            raise ConfigError(f"{config.signing_key_path} and {config.sealing_key_path} are not the keys the "
                              f"consortium lists for {self.name}")
        if member is None:
            self.log.warning("membership.not_member", epoch=membership.epoch, former=self.state.governance.former(
                self.name), detail="not a member as far as this node's chain goes: it follows the chain, and takes "
                                   "part once a proposal that admits it is adopted")
        self.mempool = Mempool(self.genesis.chain_id, membership.signing_keys, opener=self.state.open_envelope,
                               is_committed=self.state.is_committed)
        safety_store = FileSafetyStore(data / "safety.cbor")
        if safety_store.load() is None and self.block_store.committed_height() > 0:
            # Blocks but no record of what this validator signed (lost, or an interrupted restore):
            # fresh safety data could sign a second vote in a round it voted in. Treat it as restored.
            self.log.warning("safety.missing", height=self.block_store.committed_height())
            safety_store.save(SafetyData(epoch=vset.epoch, restored=True))
        core = ConsensusCore(
            vset, membership.index_of(self.name), self.identity, safety_store,
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
                                   on_connect=self._on_connect, on_disconnect=self._on_disconnect, tls=self.tls,
                                   membership=membership,
                                   refusals=self.refusals,
                                   # peers that adopted this member's next keys accept only them
                                   fallback=following[0] if following and self.identity is not following[0] else None)
        self.driver = Driver(core, membership, network=self.network, persist=self.block_store.put_block,
                             commit=self._commit, admit=self._admit, log=self.log)
        self.restore = Restore(self.driver, self.network, self.log)
        self._gossip_out: list[bytes] = []
        self._gossip_wake = trio.Event()
        self._room = trio.Event()  # set (and replaced) whenever commits take transactions out of the mempool
        # What follows each commit besides the ledger, in this order (see daemon/commits.py).
        self.waiters = TxWaiters(self.state.tx_height, self.state.tx_status, self.state.block_txs)
        self.block_feed = BlockFeed()
        self.events = EventFeed(self.name, self.state, self.log, limit=MAX_EVENT_SUBSCRIBERS)
        self.commits = Commits(self.log)
        self.commits.subscribe_each("keys.answer_failed", lambda tx: tx.kind == "keys.request",
                                    self.key_upkeep.answer)
        self.commits.subscribe_each(  # whois requests addressed to this institution, answered as they commit
            "whois.answer_failed", lambda tx: tx.kind == "whois.request" and tx.body["institution"] == self.name,
            lambda tx: self.whois.answer(tx.id))
        self.commits.subscribe("events.failed", self.events.committed)
        self.commits.subscribe("commit.waiters_failed", self.waiters.committed)
        self.commits.subscribe("commit.feed_failed", self.block_feed.committed)
        self._closed = False
        self.notifier = Notifier()
        self.metrics = self._register_metrics()
        self.head: Block = self.chain.head() or vset.genesis_block
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
        # An institution takes part in the rounds of the EMPI's OPRF key (dealing, checking, holding a share).
        self.oprf_keys: OprfKeyUpkeep | None = None
        self.oprf: OprfService | None = None
        self._oprf_serving = Holdings()
        if role == "institution" and config.master_key_path is not None:
            self.oprf_keys = OprfKeyUpkeep(
                self.name, self.genesis.chain_id, self.state,
                lambda: [self.sealing_key, *retired_sealing_keys(config)], config.master_key_path, self.submit,
                self.log)
            self.commits.subscribe_each("oprf.step_failed",
                                        lambda tx: tx.kind.startswith(("keys.oprf_", "consortium.")),
                                        self.oprf_keys.wake)
            self.oprf = OprfService(
                self.name, self.genesis.chain_id, self.state, self.oprf_keys, submit=self.submit,
                wait_committed=self.wait_committed,
                send_request=lambda peer, data: self.network.send(
                    peer, encode_frame(OprfRequestFrame(data)), bulk=True),
                send_answer=lambda peer, data: self.network.send(peer, encode_frame(OprfAnswerFrame(data)), bulk=True),
                connected=self.network.connected, daily_quota=config.oprf_daily,
                log=self.log, count=lambda outcome: self.m_oprf[outcome].inc())
        if policy is not None and config.master_key_path and config.consortium_key_path:
            self.records = RecordsService(config, chain_id=self.genesis.chain_id, member=self.keys, hooks=Hooks(
                submit=self.submit_own, pending=lambda tx_id: tx_id in self.mempool, state=self.state,
                evaluate=self._evaluate,
            ))
            self.pull_server = PullServer(
                name=self.name, genesis=self.genesis, state=self.state, records=self.records, policy=policy,
                hooks=OwnerHooks(submit=self.submit, wait_applied=self.waiters.wait_applied,
                                 send=self._send_answer, counters=self._count_pull), refusals=self.refusals)
            if self.oprf is not None:
                self.oprf.key_listeners.append(self.records.recorder.encoder.clear_caches)
        self.puller = Puller(
            name=self.name, genesis=self.genesis, member=self.keys,
            state=self.state, hooks=RequesterHooks(
                send=lambda owner, data: self.network.send(owner, encode_frame(PullFrame(data))),
                submit=self.submit, wait_committed=self.wait_committed, counters=self._count_pull))
        self.whois = WhoisDesk(name=self.name, genesis=self.genesis, member=self.keys, state=self.state,
                               users=self.users, policy=policy,
                               hooks=WhoisHooks(submit=self.submit, wait_committed=self.wait_committed))

    @property
    def vset(self) -> ValidatorSet:
        """The validators of the consensus epoch this node runs."""
        return self.driver.core.vset

    @property
    def membership(self) -> Membership:
        """The members of the consensus epoch this node runs, in the validators' order."""
        return self.driver.membership

    @property
    def index(self) -> int | None:
        """This node's place among the validators; None if it signs nothing."""
        return self.driver.core.index

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
        r.gauge("ehrnode_round", "Current consensus round.", lambda: self.driver.core.round)
        r.gauge("ehrnode_peers_connected", "Authenticated peer connections.", lambda: len(self.network.peers))
        r.gauge("ehrnode_validators", "Validators in the consortium.", lambda: self.vset.n)
        r.gauge("ehrnode_mempool_transactions", "Transactions admitted and not yet committed.",
                lambda: len(self.mempool))
        r.gauge("ehrnode_sync_behind_blocks", "How far the commit this node is catching up to is above its head.",
                lambda: self.driver.core.sync_gap)
        r.gauge("ehrnode_event_subscriptions", "events.subscribe clients (ehrnode watch) connected.",
                lambda: self.events.open)
        self.m_commits = r.counter("ehrnode_blocks_committed_total", "Blocks committed by this node.")
        self.m_txs = r.counter("ehrnode_transactions_committed_total", "Valid transactions committed.")
        self.m_invalid_txs = r.counter("ehrnode_transactions_invalid_total",
                                       "Committed transactions the ledger recorded as invalid.")
        self.m_auth_denied = r.counter("ehrnode_auth_denied_total",
                                       "Local API connections and calls refused: bad credential, throttled, "
                                       "revoked or not allowed by the user's role.")
        counts = self.driver.counts
        r.counted("ehrnode_round_timeouts_total", "Rounds this node timed out of.", lambda: counts.timeouts)
        r.counted("ehrnode_invalid_messages_total", "Consensus messages refused (sender disconnected).",
                  lambda: counts.invalid_messages)
        r.counted("ehrnode_inbox_dropped_total", "Inbound messages dropped because the node was overloaded.",
                  lambda: counts.inbox_dropped)
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
        self.m_oprf = {outcome: r.counter(f"ehrnode_oprf_{outcome}_total", text) for outcome, text in (
            ("answered", "OPRF batches this member evaluated for other members."),
            ("refused", "OPRF batches refused: not committed, not the requester's, over its daily quota, ..."),
            ("malformed", "OPRF requests that did not decode."),
        )}
        self.m_latency = r.histogram(
            "ehrnode_commit_latency_seconds", "From a block's proposal time to its commit at this node.",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        return r

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

    # --- inputs -----------------------------------------------------------------------

    def _on_frame(self, peer: Peer, frame: Frame) -> None:
        """Called by a peer connection's reader; never blocks."""
        if isinstance(frame, ConsensusFrame):
            self.driver.consensus(peer, frame.data)
        elif isinstance(frame, TxFrame):
            self.driver.transactions(peer, frame.txs)
        elif isinstance(frame, PullFrame):
            self._on_pull(peer, frame.data)
        elif isinstance(frame, AnswerFrame):
            self.puller.on_answer(peer.name, frame.data)
        elif isinstance(frame, OprfRequestFrame):
            self._on_oprf_request(peer, frame.data)
        elif isinstance(frame, OprfAnswerFrame):
            if self.oprf is not None:
                self.oprf.on_answer(peer.name, frame.data)
        elif isinstance(frame, RoundQueryFrame):
            self.restore.query(peer, frame.nonce)
        elif isinstance(frame, RoundAnswerFrame):
            self.restore.answer(peer, frame.data)

    def _admit(self, peer: Peer, data: bytes) -> bool:
        """Whether a gossiped transaction enters the mempool (and so goes to consensus)."""
        try:
            self.mempool.admit(data)
        except AdmissionError as exc:
            if exc.reason == "member_quota":
                self.refusals.refuse("mempool_member", peer.name, time.monotonic(), detail=str(exc))
            elif exc.reason != "duplicate":
                self.log.debug("tx.refused", peer=peer.name, reason=exc.reason)
            return False
        return True

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
        elif limit := server.take_slot(peer.name):
            server.reject_busy(peer.name, data, limit)
        else:
            self._nursery.start_soon(server.handle, peer.name, data)

    def _on_oprf_request(self, peer: Peer, data: bytes) -> None:
        if self.oprf is None or self._nursery is None:
            return                            # holds no share: the requester asks the others
        if self._oprf_serving.of(peer.name) >= MAX_OPRF_REQUESTS_PER_PEER:
            self.refusals.refuse("oprf_requests", peer.name, time.monotonic())
            return
        self._oprf_serving.take(peer.name)

        async def serve() -> None:
            try:
                assert self.oprf is not None
                await self.oprf.serve(peer.name, data)
            finally:
                self._oprf_serving.release(peer.name)

        self._nursery.start_soon(serve)

    async def _evaluate(self, values: Sequence[bytes], actor: bytes) -> dict[bytes, bytes]:
        if self.oprf is None:
            raise KeyUnavailable("this node takes no part in the EMPI's OPRF", reason="oprf_unavailable")
        return await self.oprf.evaluate(values, actor)

    def _on_connect(self, name: str) -> None:
        self.restore.connected(name)
        self.driver.connected(name)

    def _on_disconnect(self, name: str) -> None:
        self.driver.disconnected(name)

    # --- governance ---------------------------------------------------------------------

    def rotate_epoch_key(self, actor: bytes = b"") -> Transaction:
        """Open the next epoch: a fresh key sealed to every current member (raises AdmissionError)."""
        return self.key_upkeep.rotate(actor)

    def epoch_view(self) -> dict[str, Any]:
        return self.key_upkeep.view()

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
        self.mempool.check_room(self.name)
        tx = Transaction.create(kind, body, chain_id=self.genesis.chain_id, submitter=self.name,
                                identity=self.identity, time_ms=int(time.time() * 1000), actor=actor)
        self.submit_own(tx)
        return tx

    async def wait_room(self, timeout: float) -> None:
        """Return once fewer than OWN_BACKLOG of this node's transactions wait to be committed;
        raise AdmissionError (``backlog``) if that takes longer than ``timeout`` seconds.

        What a client's submission awaits before it signs (the node's own duties, answering
        pulls or keeping keys, do not): the pace of a bulk submitter becomes the consortium's.
        """
        with trio.move_on_after(timeout):
            while self.mempool.pending_of(self.name) >= OWN_BACKLOG:
                await self._room.wait()
            return
        raise AdmissionError(f"{self.mempool.pending_of(self.name)} transactions of {self.name} are waiting to be "
                             f"committed (at most {OWN_BACKLOG}), still after {timeout:g} s: the consortium is "
                             "committing slower than they are submitted, or not at all", reason="backlog")

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
        self.driver.own(data)

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
            nursery.start_soon(self.driver.run)
            nursery.start_soon(self._gossip)
            if self.restore.survey is not None:
                nursery.start_soon(self.restore.run)
            if self.records is not None:
                nursery.start_soon(self.records.run_outbox)
            nursery.start_soon(self._answer_pending_whois)
            nursery.start_soon(self.key_upkeep.run)
            if self.oprf_keys is not None:
                nursery.start_soon(self.oprf_keys.run)
            if self.notifier.watchdog_interval is not None:
                nursery.start_soon(self._watchdog)
            self.log.info(
                "node.started", chain=self.genesis.chain_id, height=self.head.height, peer_address=str(peer),
                api_address=str(self.config.api_listen), validators=self.vset.n,
            )
            # Listeners are bound: this is when systemd may consider the service started.
            self.notifier.notify("READY=1", f"STATUS=height {self.head.height}, listening on {peer}")
            task_status.started()
            if self.records is not None and self.config.record_prestart:
                nursery.start_soon(self._start_record_workers, self.records)

    async def _start_record_workers(self, records: RecordsService) -> None:
        """The record workers' processes, started now so the first large input does not wait."""
        started = time.monotonic()
        try:
            count = await trio.to_thread.run_sync(records.preparer.start, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - the node records without them (or says why it cannot)
            self.log.warning("records.workers_not_started", error=repr(exc))
            return
        if count:
            self.log.info("records.workers_started", workers=count, seconds=round(time.monotonic() - started, 3))

    async def _watchdog(self) -> None:
        # Pinged from the event loop itself: if the loop wedges, the pings stop and systemd
        # restarts the service.
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            self.notifier.notify("WATCHDOG=1", f"STATUS=height {self.head.height}, round {self.driver.core.round}, "
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

    def _commit(self, action: CommitBlocks) -> None:
        committed = self.chain.commit(action.blocks, action.proof, self.vset.epoch, self.mempool)
        for applied in committed.blocks:
            block, txs = applied.block, applied.txs
            self.m_commits.inc()
            self.m_txs.inc(len(txs))
            self.m_invalid_txs.inc(applied.invalid)
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
        if committed.blocks:
            self._room.set()
            self._room = trio.Event()
        if committed.ended is not None:
            self._end_epoch(committed.ended)

    def _end_epoch(self, ended: EpochEnd) -> None:
        """The block ``ended.last`` adopted a membership change: run the next epoch with it."""
        before, membership = self.membership, self.state.membership_at(ended.last.height + 1)
        vset = self.vset.successor(ended.last, membership.keys)
        index = membership.index_of(self.name)
        listed = membership.get(self.name)
        if listed is not None and listed.signing_key != self.identity.public_key:
            if adopt_next_keys(self.config, self.keys, next_keys(self.config),
                               (listed.signing_key, listed.sealing_key), self.log):
                # The recorder, vault, pulls and whois sign and open with them now; later epochs'
                # keys are sealed to the new sealing key.
                self.epoch_keys.add_sealing_key(self.sealing_key)
                self.network.set_identity(self.identity)
            else:
                index = None  # re-keyed with keys this node does not hold: it signs nothing more
                self.log.error("membership.keys_replaced", epoch=membership.epoch,
                               detail="the consortium adopted keys for this member that this node does not hold")
        if self.name in membership:
            self.network.set_membership(membership)
        # A removed member keeps its links as they were: a validator still in the old epoch may
        # need it to learn that the epoch ended (its peers refuse it once they have moved on).
        self.mempool.set_members(membership.signing_keys)
        added = sorted(set(membership.names) - set(before.names))
        removed = sorted(set(before.names) - set(membership.names))
        self.log.warning("membership.changed", epoch=membership.epoch, height=ended.last.height, added=added,
                         removed=removed, members=membership.names, validator=index is not None)
        if self.name in removed:
            self.log.error("membership.removed", epoch=membership.epoch,
                           detail="the consortium removed this member: peers refuse it from now on, and later "
                                  "epoch keys are not sealed to it")
        self.key_upkeep.membership_changed()
        self.driver.succeed(self.driver.core.successor(vset, index, self.identity), membership)

    # --- views --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name, "chain": self.genesis.chain_id, "height": self.head.height, "head": self.head.id.hex(),
            "round": self.driver.core.round, "peers": self.network.connected(), "mempool": len(self.mempool),
            "validators": self.vset.n, "pid": os.getpid(), "epoch": self.state.current_epoch,
            "consensus_epoch": self.vset.epoch, "validator": self.index is not None,
            "ledger": {"applied": self.state.applied_height, "stalled_at": self.chain.stalled_at},
            "fhir": self.fhir_base,
            "oprf": self.oprf_keys.view() if self.oprf_keys is not None else self.state.oprf.view(),
        }

    @property
    def fhir_base(self) -> str | None:
        """The base URL of this node's FHIR REST interface (None: turned off)."""
        address = self.config.fhir_listen
        if address is None:
            return None
        if self.config.fhir_base_url is not None:
            return self.config.fhir_base_url
        scheme = "https" if self.config.tls is not None and self.config.tls.api else "http"
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{scheme}://{host}:{address.port}/fhir"

    def records_list(self, empi: str) -> list[dict[str, Any]]:
        """Every committed anchor for ``empi`` across the consortium (any member can answer)."""
        return [anchor_view(a) for a in self.state.anchors(empi=empi)]

    def block_view(self, height: int | None, *, ids_only: bool = False) -> dict[str, Any] | None:
        """A committed block as the API shows it: each transaction opened and summarized, or with
        ``ids_only`` only each one's id and status, as the ledger recorded them when it applied the
        block (when it has not, or recorded an entry under an earlier block, as a transaction
        committed twice is, the entries are opened to tell)."""
        height = self.head.height if height is None else height
        block = self.block_store.block_at(height)
        if block is None:
            return None
        recorded = self.state.block_txs(block.height) if ids_only else []
        if ids_only and len(recorded) == len(block.payload):
            txs = [{"id": tx_id.hex(), "status": status} for tx_id, status in recorded]
        else:
            txs = self._opened_txs(block)
        view: dict[str, Any] = {
            "height": block.height, "id": block.id.hex(), "parent": block.parent.hex(), "round": block.round,
            "time": block.timestamp, "epoch": block.epoch,
            "author": self.state.governance.of_epoch(block.epoch).members[block.author].name if block.height else None,
            "txs": txs,
        }
        return view

    def _opened_txs(self, block: Block) -> list[dict[str, Any]]:
        txs: list[dict[str, Any]] = []
        for data in block.payload:
            try:
                envelope, tx = self.state.open_envelope(data, block.height)
            except (AdmissionError, KeyUnavailable) as exc:
                txs.append({"id": crypto.sha256(data).hex(), "kind": "unreadable", "reason": exc.reason})
            else:
                txs.append({**tx.summary(), "epoch": envelope.epoch, "envelope": envelope.id.hex()})
        return txs


