"""Authenticated websocket connections to the other consortium members.

Theory of operation
-------------------
Each pair of members keeps one connection, dialed by the member whose name
sorts first; the other side only listens. A member that reconnects (after a
crash or a network cut) replaces its old connection: the newest authenticated
connection for a name wins, the old one is closed. That resolves duplicates the
same way on both sides without any negotiation.

The listener is ``trio.serve_tcp`` with one handler per TCP connection, and
each handler wraps its stream in a websocket itself and catches everything but
cancellation: a peer that sends garbage, fails the handshake or crashes its
handler closes that connection only, never the listener.

Each side pings the other, ``PING_INTERVAL`` after the last answer; a connection that brings
neither a message nor an answer to a ping for ``SILENT_TIMEOUT`` is closed
(``peer.unresponsive``), so a member that hangs while its sockets stay open is treated like one
that stopped.

Every connection has a bounded send queue drained by its own writer task. When
a peer is slow or gone the queue fills and further frames to it are dropped
(and counted): consensus re-sends what matters (timeouts, sync requests), and
no peer can stall the node. The writer sends what has queued up meanwhile as one
batch (to a peer that speaks version 3): under load a message per frame cost both
ends more than the frames did. Received frames are decoded strictly; a bad frame
closes the connection with a logged reason.
"""

from __future__ import annotations

import contextlib
import random
import ssl
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed
from trio_websocket import HandshakeError as WsHandshakeError
from wsproto.utilities import LocalProtocolError

from .. import crypto
from ..config import Genesis, Member
from ..errors import ProtocolError, innermost
from ..limits import Holdings, Refusals
from ..logs import get_logger
from ..membership import Membership
from .protocol import (
    BATCH_BYTES,
    BATCH_VERSION,
    MAX_BATCH_FRAMES,
    MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME,
    OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Auth,
    BatchFrame,
    Frame,
    Hello,
    Welcome,
    check_transcript,
    decode_frame,
    encode_frame,
    sign_transcript,
    unbatch,
)
from .tls import TlsContexts, Watched, require_name

HANDSHAKE_TIMEOUT = 10.0
SEND_QUEUE = 1024
#: Bytes waiting in one peer's bulk queue (gossip, pull answers): a peer that stops reading
#: cannot make the node hold more for it.
BULK_QUEUE_BYTES = 96 * 1024 * 1024
RECEIVE_BUFFER = 65536
#: Websocket close codes: 1000 normal, 1001 going away, 1002 protocol error, 1008 policy violation.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
#: How long a peer that broke the protocol is given to take the close frame: its frames queued
#: before it go first, and a loaded peer may read them slowly; without the frame it never
#: learns why it was dropped.
VIOLATION_CLOSE_WAIT = 10.0
#: Seconds a re-keyed member's link, proved with its old key, is kept after the change.
REKEY_GRACE = 30.0

FrameHandler = Callable[["Peer", Frame], None]
#: Handshakes in progress at once: unauthenticated connections cannot pile up. A connection
#: takes a slot only once it has sent its first bytes, so idle sockets hold none.
MAX_PENDING_HANDSHAKES = 32
#: Unauthenticated connections from one source address (idle or handshaking): one address
#: cannot take the slots every member needs to connect.
MAX_UNAUTHENTICATED_PER_SOURCE = 8
#: Seconds a new connection may stay silent before it is closed.
FIRST_BYTES_TIMEOUT = 5.0
#: Seconds from one answered ping to the next, on each authenticated connection.
PING_INTERVAL = 2.0
#: Seconds without a whole message or an answered ping from a peer before its connection is
#: closed: a hung member (a stopped process, a stalled machine) then counts as unreachable, as a
#: crashed one does. A message is heard only once it has all arrived, and a pong cannot pass a
#: message being sent: this leaves the largest frame (8 MiB) a minute, a link of 1.2 Mbit/s.
SILENT_TIMEOUT = 60.0


class Peer:
    """One authenticated connection to member ``name``.

    Two bounded send queues: consensus frames go first, gossip (transaction batches)
    after, so a burst of transactions never delays a vote. ``batches``: the peer takes
    several frames in one message (it speaks version 3).
    """

    def __init__(self, name: str, ws: trio_websocket.WebSocketConnection, dialed: bool, *,
                 batches: bool = False) -> None:
        self.name = name
        self.ws = ws
        self.dialed = dialed
        self.batches = batches
        self.dropped = 0
        self.sent = 0  # frames
        self.messages = 0  # websocket messages they went in
        self.kicked: str | None = None
        self.scope: trio.CancelScope | None = None
        self._urgent: deque[bytes] = deque()
        self._bulk: deque[bytes] = deque()
        self._bulk_bytes = 0
        self._wake = trio.Event()
        #: Set while no consensus frame waits in this connection's queue or is being sent.
        self._urgent_idle = trio.Event()
        self._urgent_idle.set()
        self._closed = False
        #: When a message or the answer to a ping last came from the peer (trio's clock).
        self.heard = trio.current_time()

    def kick(self, reason: str) -> None:
        """Drop this connection (from any task): the peer sent something it must not.

        Only this connection: a newer one from the same member is not touched.
        """
        if self.kicked is None:
            self.kicked = reason
        if self.scope is not None:
            self.scope.cancel()

    def send(self, data: bytes, *, bulk: bool = False) -> bool:
        """Queue ``data``; False (and counted) when its queue is full or the connection closed."""
        queue = self._bulk if bulk else self._urgent
        if self._closed or len(queue) >= SEND_QUEUE or (bulk and self._bulk_bytes + len(data) > BULK_QUEUE_BYTES):
            self.dropped += 1
            return False
        queue.append(data)
        if bulk:
            self._bulk_bytes += len(data)
        elif self._urgent_idle.is_set():
            self._urgent_idle = trio.Event()
        self._wake.set()
        return True

    async def urgent_sent(self) -> None:
        """Wait until the consensus frames queued so far have been handed to the kernel (or the
        connection is gone)."""
        await self._urgent_idle.wait()

    async def writer(self) -> None:
        """Send the queued frames until the connection closes.

        Ends quietly once this side starts closing or the connection is gone: a send failing
        there must not cancel the reader, which may be in the middle of sending the close frame
        (the other side would then see the connection drop with no code).
        """
        try:
            while not self._closed:
                if not self._urgent and not self._bulk:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                frames = self._take()
                data = frames[0] if len(frames) == 1 else encode_frame(BatchFrame(tuple(frames)))
                try:
                    await self.ws.send_message(data)
                except ConnectionClosed:
                    return  # the reader sees the close too, and ends the connection
                self.sent += len(frames)
                self.messages += 1
                if not self._urgent:
                    self._urgent_idle.set()
        finally:
            self._urgent_idle.set()  # nothing more will be sent: nobody waits for it

    def _take(self) -> list[bytes]:
        """What goes in the next message: the first queued frame, consensus before gossip, and
        (to a peer that takes batches) the frames queued behind it in the same queue, up to
        BATCH_BYTES. A consensus frame never waits behind gossip bytes in the same message."""
        queue = self._urgent or self._bulk
        frames = [queue.popleft()]
        size = len(frames[0])
        if self.batches:
            while queue and len(frames) < MAX_BATCH_FRAMES and size + len(queue[0]) <= BATCH_BYTES:
                frames.append(queue.popleft())
                size += len(frames[-1])
        if queue is self._bulk:
            self._bulk_bytes -= size
        return frames

    async def close(self, code: int, reason: str, wait: float = 2.0) -> None:
        """Close with ``code``, waiting up to ``wait`` seconds for the close handshake (past it the
        connection is dropped, and the other side sees no code)."""
        self._closed = True
        await _close(self.ws, code, reason, wait)


class PeerNetwork:
    def __init__(
        self, genesis: Genesis, name: str, identity: crypto.Identity, on_frame: FrameHandler,
        *, on_connect: Callable[[str], None] = lambda _n: None,
        on_disconnect: Callable[[str], None] = lambda _n: None, tls: TlsContexts | None = None,
        membership: Membership | None = None, refusals: Refusals | None = None,
        fallback: crypto.Identity | None = None,
        versions: tuple[int, int] = (OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION),
    ) -> None:
        self.genesis = genesis
        #: The protocol versions this node speaks (oldest, newest).
        self.versions = versions
        #: Peers that refused the newest version when last dialed: dialed once in the oldest.
        self._speak_oldest: set[str] = set()
        #: Who may connect, and whom to dial: the members as this node last learnt them.
        self.membership = membership or Membership(0, 0, genesis.members)
        self._dialing: dict[str, tuple[Member, trio.CancelScope]] = {}
        self._keys_at_connect: dict[str, bytes] = {}  # the signing key each peer proved
        self._dial_nursery: trio.Nursery | None = None
        self.tls = tls
        self.name = name
        self.identity = identity
        #: The member's next key (during a rotate-key): tried when a peer refuses the current one,
        #: as peers that have adopted the change do.
        self.fallback = fallback
        self._use_fallback: set[str] = set()  # peers that refused the current key
        self.on_frame = on_frame
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.peers: dict[str, Peer] = {}
        self.rejected = 0
        self.dropped_closed = 0  # frames dropped by connections that are gone now
        self.log = get_logger(node=name)
        self._closing = False
        self._handshakes = trio.Semaphore(MAX_PENDING_HANDSHAKES)
        self._unauthenticated = Holdings()  # source address -> connections not authenticated yet
        self.refusals = refusals or Refusals(name)

    # --- sending --------------------------------------------------------------------

    def send(self, name: str, data: bytes, *, bulk: bool = False) -> bool:
        peer = self.peers.get(name)
        return peer.send(data, bulk=bulk) if peer is not None else False

    def broadcast(self, data: bytes, *, bulk: bool = False) -> None:
        for peer in list(self.peers.values()):
            peer.send(data, bulk=bulk)

    async def urgent_sent(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until every consensus frame queued so far has been
        handed to the kernel: a peer that reads slowly holds nobody up for longer."""
        with trio.move_on_after(timeout):
            for peer in list(self.peers.values()):
                await peer.urgent_sent()

    def connected(self) -> list[str]:
        return sorted(self.peers)

    def kick(self, peer: Peer, reason: str) -> None:
        self.log.warning("peer.kicked", peer=peer.name, reason=reason)
        peer.kick(reason)

    # --- running --------------------------------------------------------------------

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for peers; reports the bound listeners through ``task_status``."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._inbound, port, host=host))
            self.log.info("peer.listening", address=f"{host}:{port}")
            task_status.started(listeners)

    async def dial_all(self) -> None:
        """Keep a connection to every member whose name sorts after ours (as membership changes)."""
        async with trio.open_nursery() as nursery:
            self._dial_nursery = nursery
            self.set_membership(self.membership)
            await trio.sleep_forever()

    def set_membership(self, membership: Membership) -> None:
        """Follow a change of membership: a member no longer in it is disconnected and refused
        from now on, a new one is dialed (or awaited), a moved one is dialed at its new address.
        A node that is no longer a member itself stops dialing."""
        self.membership = membership
        for name, peer in list(self.peers.items()):
            if name not in membership:
                self.log.warning("peer.kicked", peer=name, reason="not_member")
                peer.kick("not_member")
            elif membership.member(name).signing_key != self._keys_at_connect.get(name) and self._dial_nursery:
                # Re-keyed: its link, proved with the old key, stays a little while so it can learn
                # of the change (and switch keys); then it must prove the new one.
                self._dial_nursery.start_soon(self._kick_later, peer, "rekeyed")
        if self._dial_nursery is None:
            return
        wanted = {m.name: m for m in membership if m.name > self.name} if self.name in membership else {}
        for name, (member, scope) in list(self._dialing.items()):
            if name not in wanted or wanted[name].address != member.address:
                scope.cancel()  # gone, or moved (a change of keys alone keeps the link: see above)
                del self._dialing[name]
        for name, member in wanted.items():
            if name not in self._dialing:
                scope = trio.CancelScope()
                self._dialing[name] = (member, scope)
                self._dial_nursery.start_soon(self._dial_scoped, scope, member)

    async def _kick_later(self, peer: Peer, reason: str) -> None:
        await trio.sleep(REKEY_GRACE)
        if self.peers.get(peer.name) is peer:
            self.log.warning("peer.kicked", peer=peer.name, reason=reason)
            peer.kick(reason)

    def set_identity(self, identity: crypto.Identity) -> None:
        """This member's keys were replaced: prove the new one from now on."""
        self.identity, self.fallback = identity, None
        self._use_fallback.clear()

    def _identity_for(self, name: str) -> crypto.Identity:
        if name in self._use_fallback and self.fallback is not None:
            return self.fallback
        return self.identity

    async def _dial_scoped(self, scope: trio.CancelScope, member: Member) -> None:
        with scope:
            await self._dial_forever(member.name, member.address.host, member.address.port)

    async def close_all(self) -> None:
        """Stop dialing and accepting, and close every connection with 1001 (all at once)."""
        self._closing = True
        async with trio.open_nursery() as nursery:
            for peer in list(self.peers.values()):
                nursery.start_soon(peer.close, CLOSE_GOING_AWAY, "node shutting down")

    async def _dial_forever(self, name: str, host: str, port: int) -> None:
        backoff = 0.1
        while not self._closing:
            connected = False
            # One dial in the oldest version after a refusal of the newest, then the newest again:
            # a peer upgraded meanwhile is not left speaking the oldest.
            version = self.versions[0] if name in self._speak_oldest else self.versions[1]
            self._speak_oldest.discard(name)
            try:
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        channel = b""
                        if self.tls is None:
                            ws = await trio_websocket.connect_websocket(
                                nursery, host, port, "/peer", use_ssl=False, max_message_size=MAX_HANDSHAKE_FRAME,
                                message_queue_size=16, receive_buffer_size=RECEIVE_BUFFER,
                            )
                        else:
                            ws, channel = await self._dial_tls(nursery, name, host, port)
                        await self._dialer_handshake(ws, name, channel, version)
                    _authenticated(ws)
                    connected = True
                    backoff = 0.1
                    await self._run(Peer(name, ws, dialed=True, batches=version >= BATCH_VERSION))
                    nursery.cancel_scope.cancel()
            except Exception as group:  # noqa: BLE001 - one peer's failure must not stop the others
                exc = innermost(group)
                if isinstance(exc, _DISCONNECTS):
                    self.log.debug("peer.dial_failed", peer=name, error=str(exc) or type(exc).__name__)
                elif isinstance(exc, ProtocolError) and exc.reason == "refused:version" and version > self.versions[0]:
                    # Not upgraded yet (expected while members upgrade one at a time): the next dial
                    # speaks the oldest version.
                    self._speak_oldest.add(name)
                    self.log.info("peer.older_version", peer=name, error=str(exc))
                elif isinstance(exc, ProtocolError):
                    self.rejected += 1
                    self.log.warning("peer.rejected", peer=name, reason=exc.reason, error=str(exc))
                    if exc.reason == "refused:bad_signature" and self.fallback is not None:
                        self._use_fallback ^= {name}  # it may know our next key (or, again, the current)
                else:
                    self.log.warning("peer.error", peer=name, error=repr(exc))
            if connected:
                self.log.info("peer.disconnected", peer=name)
            # Jittered exponential backoff: peers restarting together do not dial in lockstep.
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10.0)

    async def _dial_tls(self, nursery: trio.Nursery, name: str, host: str,
                        port: int) -> tuple[trio_websocket.WebSocketConnection, bytes]:
        """TLS to ``name``: its certificate checked before anything is sent; a refusal of ours is told."""
        assert self.tls is not None
        stream = trio.SSLStream(await trio.open_tcp_stream(host, port), self.tls.peer_client, server_hostname=None)
        try:
            await _tls_handshake(stream)
            require_name(stream, name)  # before anything is sent: the right member's certificate
            channel = self.tls.channel(stream, dialer=True)
            with trio.CancelScope() as scope:
                watched = Watched(stream, scope)
                return await trio_websocket.wrap_client_stream(
                    nursery, watched,  # type: ignore[arg-type]  # any trio Stream works; it is annotated narrowly
                    host, "/peer", max_message_size=MAX_HANDSHAKE_FRAME,
                    message_queue_size=16, receive_buffer_size=RECEIVE_BUFFER,
                ), channel
            raise watched.refusal() or trio.BrokenResourceError("the connection broke during the TLS handshake")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _inbound(self, stream: trio.SocketStream) -> None:
        remote = _remote(stream)
        source = remote.rpartition(":")[0] or remote
        if self._unauthenticated.of(source) >= MAX_UNAUTHENTICATED_PER_SOURCE:
            self.refusals.refuse("peer_source", source, trio.current_time(),
                                 detail=f"{MAX_UNAUTHENTICATED_PER_SOURCE} connections from it not authenticated yet")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return
        self._unauthenticated.take(source)
        counted = True

        def authenticated() -> None:  # once, at the handshake's end or the connection's
            nonlocal counted
            if counted:
                counted = False
                self._unauthenticated.release(source)

        try:
            async with trio.open_nursery() as nursery:
                # No handshake slot before the first bytes: an idle socket holds none.
                with trio.move_on_after(FIRST_BYTES_TIMEOUT) as idle:
                    await trio.lowlevel.wait_readable(stream.socket)
                if idle.cancelled_caught:
                    self.refusals.refuse("peer_idle", source, trio.current_time(),
                                         detail=f"sent nothing within {FIRST_BYTES_TIMEOUT:g} s")
                    nursery.cancel_scope.cancel()
                    return
                if self._handshakes.value == 0:
                    self.refusals.refuse("peer_handshakes", source, trio.current_time(),
                                         detail=f"{MAX_PENDING_HANDSHAKES} handshakes in progress")
                    nursery.cancel_scope.cancel()
                    return
                async with self._handshakes:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        conn: trio.abc.Stream = stream
                        if self.tls is not None:
                            try:
                                conn = await _tls_handshake(trio.SSLStream(stream, self.tls.peer_server,
                                                                           server_side=True))
                            except ProtocolError as exc:
                                self.rejected += 1
                                self.log.warning("peer.rejected", remote=remote, reason=exc.reason, error=str(exc))
                                nursery.cancel_scope.cancel()
                                return
                        # Until the peer has proved who it is, it may not make us buffer more than
                        # a handshake frame.
                        request = await trio_websocket.wrap_server_stream(
                            nursery, conn, message_queue_size=2, max_message_size=MAX_HANDSHAKE_FRAME,
                            receive_buffer_size=RECEIVE_BUFFER,
                        )
                        ws = await request.accept()
                        try:
                            name, version = await self._listener_handshake(
                                ws, conn if isinstance(conn, trio.SSLStream) else None)
                        except ProtocolError as exc:
                            self.rejected += 1
                            self.log.warning("peer.rejected", remote=remote, reason=exc.reason, error=str(exc))
                            await _close(ws, CLOSE_POLICY, exc.reason)
                            nursery.cancel_scope.cancel()
                            return
                _authenticated(ws)
                authenticated()
                await self._run(Peer(name, ws, dialed=False, batches=version >= BATCH_VERSION))
                nursery.cancel_scope.cancel()
        except Exception as group:  # noqa: BLE001 - never let one connection take the listener down
            cause = innermost(group)
            if isinstance(cause, _DISCONNECTS):
                self.log.debug("peer.inbound_closed", remote=remote, error=str(cause) or type(cause).__name__)
            else:
                self.log.warning("peer.error", remote=remote, error=repr(cause))
        finally:
            authenticated()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    # --- handshake ------------------------------------------------------------------

    async def _dialer_handshake(self, ws: trio_websocket.WebSocketConnection, expected: str,
                                channel: bytes = b"", version: int | None = None) -> int:
        """Prove who this node is to ``expected``, speaking ``version`` (default the newest);
        returns it, once the listener has answered in it."""
        hello = Hello.fresh(self.genesis, self.name, self.versions[1] if version is None else version)
        await ws.send_message(encode_frame(hello))
        welcome = decode_frame(await _handshake_message(ws), max_size=MAX_HANDSHAKE_FRAME)
        if not isinstance(welcome, Welcome):
            raise ProtocolError("expected a welcome frame", reason="unexpected_frame")
        welcome.hello.check_against(self.genesis, self.membership.signing_keys, self.versions)
        if welcome.hello.version != hello.version:
            raise ProtocolError(f"dialed in protocol version {hello.version}, answered in {welcome.hello.version}",
                                reason="version_mismatch")
        if welcome.hello.name != expected:
            raise ProtocolError(f"dialed {expected!r} but {welcome.hello.name!r} answered", reason="wrong_peer")
        check_transcript(self.genesis, hello, welcome.hello, "listener", welcome.signature, channel,
                         self.membership.signing_keys)
        identity = self._identity_for(expected)
        await ws.send_message(encode_frame(Auth(sign_transcript(identity, self.genesis, hello, welcome.hello,
                                                                "dialer", channel))))
        return hello.version

    async def _listener_handshake(self, ws: trio_websocket.WebSocketConnection,
                                  tls: trio.SSLStream | None = None) -> tuple[str, int]:
        """Check who dialed; returns its name and the protocol version it speaks (answered in)."""
        hello = decode_frame(await _handshake_message(ws), max_size=MAX_HANDSHAKE_FRAME)
        if not isinstance(hello, Hello):
            raise ProtocolError("expected a hello frame", reason="unexpected_frame")
        hello.check_against(self.genesis, self.membership.signing_keys, self.versions)
        channel = b""
        if tls is not None:
            require_name(tls, hello.name)  # the member about to prove itself must be the one certified
            assert self.tls is not None
            channel = self.tls.channel(tls, dialer=False)
        if hello.name == self.name:
            raise ProtocolError("a peer claims this node's own name", reason="own_name")
        if hello.name > self.name:
            # Each pair has one connection, dialed by the name that sorts first.
            raise ProtocolError(f"{hello.name!r} must wait for {self.name!r} to dial it", reason="wrong_direction")
        mine = Hello.fresh(self.genesis, self.name, hello.version)
        signature = sign_transcript(self._identity_for(hello.name), self.genesis, hello, mine, "listener", channel)
        await ws.send_message(encode_frame(Welcome(mine, signature)))
        auth = decode_frame(await _handshake_message(ws), max_size=MAX_HANDSHAKE_FRAME)
        if not isinstance(auth, Auth):
            raise ProtocolError("expected an auth frame", reason="unexpected_frame")
        check_transcript(self.genesis, hello, mine, "dialer", auth.signature, channel, self.membership.signing_keys)
        return hello.name, hello.version

    # --- one connection -----------------------------------------------------------------

    async def _run(self, peer: Peer) -> None:
        if self._closing:
            await peer.close(CLOSE_GOING_AWAY, "node shutting down")
            return
        member = self.membership.get(peer.name)
        if member is None:  # removed while it was completing its handshake
            await peer.close(CLOSE_POLICY, "not_member")
            return
        self._keys_at_connect[peer.name] = member.signing_key
        old = self.peers.get(peer.name)
        self.peers[peer.name] = peer
        if old is not None:
            self.log.info("peer.replaced", peer=peer.name)
            await old.close(CLOSE_POLICY, "replaced by a newer connection")
        self.log.info("peer.connected", peer=peer.name, dialed=peer.dialed, batches=peer.batches)
        self.on_connect(peer.name)
        try:
            with trio.CancelScope() as peer.scope:
                if peer.kicked is not None:
                    return  # kicked while the connection it replaced was closing
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer.writer)
                    nursery.start_soon(self._keepalive, peer)
                    await self._read(peer)
                    nursery.cancel_scope.cancel()
        finally:
            if self.peers.get(peer.name) is peer:
                del self.peers[peer.name]
                self.on_disconnect(peer.name)
            self.dropped_closed += peer.dropped
            with trio.CancelScope(shield=True):
                if peer.kicked is not None:
                    await peer.close(CLOSE_POLICY, peer.kicked)
                else:
                    await peer.close(CLOSE_GOING_AWAY if self._closing else 1000, "closed")

    async def _keepalive(self, peer: Peer) -> None:
        """Ping ``peer`` every ``PING_INTERVAL``, and close the connection once it has been silent
        (no message, no answered ping) for ``SILENT_TIMEOUT``."""

        async def ping() -> None:
            while True:
                try:
                    await peer.ws.ping()
                except (ConnectionClosed, LocalProtocolError):
                    return  # closing (a ping racing the close is refused by wsproto): the reader ends it
                peer.heard = trio.current_time()
                await trio.sleep(PING_INTERVAL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            awake = trio.current_time()
            while True:
                await trio.sleep(PING_INTERVAL)
                now = trio.current_time()
                if now - awake > 2 * PING_INTERVAL:
                    # This node itself stalled (a paused machine, a stopped process): what the peer
                    # sent meanwhile may still be waiting to be read. Silence counts from now on.
                    peer.heard = max(peer.heard, now)
                awake = now
                silent = now - peer.heard
                if silent >= SILENT_TIMEOUT:
                    self.log.warning("peer.unresponsive", peer=peer.name, silent=round(silent, 1))
                    peer.kick("unresponsive")
                    return

    async def _read(self, peer: Peer) -> None:
        while True:
            try:
                data = await peer.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                if reason is not None and reason.code == 1009:
                    self.log.warning("peer.frame_too_large", peer=peer.name)
                return
            peer.heard = trio.current_time()
            try:
                frame = decode_frame(data)
                if isinstance(frame, BatchFrame) and not peer.batches:
                    raise ProtocolError("a batch from a peer that speaks version 2", reason="unexpected_batch")
                frames = unbatch(frame)
            except ProtocolError as exc:
                self.log.warning("peer.bad_frame", peer=peer.name, reason=exc.reason, error=str(exc))
                await peer.close(CLOSE_PROTOCOL, exc.reason, wait=VIOLATION_CLOSE_WAIT)
                return
            if isinstance(frame, (Hello, Welcome, Auth)):
                self.log.warning("peer.bad_frame", peer=peer.name, reason="handshake_after_auth")
                await peer.close(CLOSE_PROTOCOL, "handshake frame after authentication", wait=VIOLATION_CLOSE_WAIT)
                return
            for each in frames:
                try:
                    self.on_frame(peer, each)
                except ProtocolError as exc:
                    self.log.warning("peer.invalid_message", peer=peer.name, reason=exc.reason, error=str(exc))
                    await peer.close(CLOSE_POLICY, exc.reason, wait=VIOLATION_CLOSE_WAIT)
                    return


def _authenticated(ws: trio_websocket.WebSocketConnection) -> None:
    """Raise the message size limit to full frames once the peer is authenticated.

    trio-websocket (pinned below 0.13) reads this attribute for every message; it has no
    public setter.
    """
    ws._max_message_size = MAX_FRAME_BYTES


_DISCONNECTS = (OSError, trio.TooSlowError, ConnectionClosed, WsHandshakeError, trio.BrokenResourceError)


async def _tls_handshake(stream: trio.SSLStream) -> trio.SSLStream:
    """Complete a TLS handshake; a certificate refused either way is a ProtocolError (``tls``)."""
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        # A connection opened and closed (a port scan, a health check) is no refusal.
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            raise ProtocolError(f"TLS handshake refused: {cause.reason or cause}", reason="tls") from exc
        raise
    return stream


async def _handshake_message(ws: trio_websocket.WebSocketConnection) -> bytes | str:
    try:
        return await ws.get_message()
    except ConnectionClosed as exc:
        if exc.reason is not None and exc.reason.code == 1009:
            raise ProtocolError("handshake frame larger than any frame may be", reason="too_large") from exc
        if exc.reason is not None and exc.reason.code == CLOSE_POLICY and exc.reason.reason:
            # The other side refused us, and said why (not a member any more, say).
            raise ProtocolError(f"the peer refused this node: {exc.reason.reason}",
                                reason=f"refused:{exc.reason.reason}"[:64]) from exc
        raise


#: What closing a connection may raise when the connection is going anyway (the other side
#: reset it, or a close from the other side is closing the same stream at that moment). The
#: close is then unclean, and the stream is closed all the same: never an error of the node's,
#: which must not stop a shutdown or a listener.
_CLOSE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)


async def _close(ws: trio_websocket.WebSocketConnection, code: int, reason: str, wait: float = 2.0) -> None:
    """Close with ``code``, waiting up to ``wait`` seconds for the close handshake."""
    with trio.move_on_after(wait), contextlib.suppress(*_CLOSE_ERRORS):
        await ws.aclose(code, reason[:120])


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "?"
