"""The local API's server: JSON-RPC 2.0 over a websocket on loopback, for the CLI and the
hospital's systems.

Every client acts as one of the node's users (:mod:`ehrnode.users`): the websocket opening
request carries ``Authorization: Bearer <credential>`` and, optionally, ``X-Ehrnode-User:
<name>``. A wrong or missing credential is refused with HTTP 401, a revoked user with 403, a
throttled name with 429, before any JSON is read, and logged as ``auth.denied``. The node's
own admin credential is ``<data_dir>/api.token`` (created 0600 on first start).

Each call is routed by the method table (:mod:`.methods`, which ``docs/api.md`` shows) and
checked against the user's role (``[users] roles``): a call the role does not allow is refused
with ``data.reason`` ``forbidden`` and logged as ``auth.denied``; a patient-role user's call
must name their own EMPI; a user revoked or rotated while connected is refused at their next
call and disconnected. Transactions a call submits carry the user's pseudonym.

Errors follow JSON-RPC: -32700 parse error, -32600 invalid request, -32601 unknown method,
-32602 bad params, -32000 refused by the node (``data.reason`` says why, e.g.
``mempool_full``). A bad request gets an error; the connection stays open.

Limits: at most ``MAX_UNAUTHENTICATED`` connections not yet authenticated and
``MAX_CONNECTIONS`` in all (refusals counted as ``api_unauthenticated``, ``api_connections``);
a message is at most ``MAX_REQUEST_BYTES``, parsed on the node's one loop (so one at a time), and
staged input is counted by its parsed size (:mod:`.call`).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from ..errors import innermost
from ..users.roles import Roles
from .call import ApiState, Session
from .facade import NodeFacade
from .gate import Gate
from .rpc import MAX_REQUEST_BYTES, Disconnect, RpcError, parse, parsed_size

#: Connections not authenticated yet (a local process cannot exhaust the node's descriptors),
#: and connections in all.
MAX_UNAUTHENTICATED = 64
MAX_CONNECTIONS = 512


class ApiServer:
    """Serves the local API of ``node``; users' roles from ``roles`` (checked against the table)."""

    def __init__(self, node: NodeFacade, roles: Roles) -> None:
        self.node = node
        self.state = ApiState(node, roles)
        self.gate = Gate(self.state)
        self._unauthenticated = 0
        self._connections = 0

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._connection, port, host=host))
            self.state.log.info("api.listening", address=f"{host}:{port}")
            task_status.started(listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        limit = ("api_connections" if self._connections >= MAX_CONNECTIONS
                 else "api_unauthenticated" if self._unauthenticated >= MAX_UNAUTHENTICATED else None)
        if limit is not None:
            self.node.refusals.refuse(limit, "local", trio.current_time(),
                                      detail=f"{self._connections} connections, {self._unauthenticated} not "
                                             f"authenticated yet (at most {MAX_CONNECTIONS}, {MAX_UNAUTHENTICATED})")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        self._unauthenticated += 1
        pending = True

        def authenticated() -> None:
            nonlocal pending
            if pending:
                pending = False
                self._unauthenticated -= 1

        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(10):
                    conn: trio.abc.Stream = stream
                    tls = self.node.tls.api_server if self.node.tls is not None else None
                    if tls is not None:
                        conn = trio.SSLStream(stream, tls, server_side=True)
                        await conn.do_handshake()
                    request = await trio_websocket.wrap_server_stream(
                        nursery, conn, max_message_size=MAX_REQUEST_BYTES, message_queue_size=4,
                    )
                    outcome, _ = self.gate.authenticate(request.headers)
                    if outcome.user is not None:
                        ws = await request.accept()
                        authenticated()
                if outcome.user is None:
                    # Answered late, a few at a time over the whole API: wrong answers come slowly however
                    # many guess at once. Past a queue of them, a failure is just closed: no socket is held.
                    if await self.gate.hold_refusal(outcome):
                        headers = [(b"retry-after", str(int(outcome.delay) + 1).encode())] \
                            if outcome.status == 429 else []
                        with trio.move_on_after(10):
                            await request.reject(outcome.status, extra_headers=headers,
                                                 body=f"{outcome.message}\n".encode())
                    nursery.cancel_scope.cancel()
                    return
                user = outcome.user
                session = Session(user, ws, nursery)
                self.state.sessions.add(session)
                try:
                    await self._session(session)
                finally:
                    self.state.sessions.discard(session)
                nursery.cancel_scope.cancel()
        except trio.Cancelled:
            raise
        except Exception as group:  # noqa: BLE001 - one client's failure must not stop the API
            exc = innermost(group)
            if isinstance(exc, trio.BrokenResourceError):  # a client that does not speak TLS, or gave up
                self.state.log.info("api.tls_failed", error=str(exc.__cause__ or exc))
            elif not isinstance(exc, (ConnectionClosed, trio.TooSlowError, trio_websocket.HandshakeError, OSError)):
                self.state.log.warning("api.error", error=repr(exc))
        finally:
            authenticated()
            self._connections -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _session(self, session: Session) -> None:
        ws = session.ws
        assert ws is not None
        try:
            while True:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed:
                    return
                session.staged.message_bytes = parsed_size(raw)
                request = parse(raw)
                del raw
                reply, close = await self._dispatch(request, session)
                await ws.send_message(json.dumps(reply))
                if close:
                    await ws.aclose(1008, close)
                    return
        finally:
            self.state.release(session.staged)

    async def _dispatch(self, request: Any, session: Session) -> tuple[dict[str, Any], str]:
        """The reply to one request (parsed, or the RpcError parsing it raised), and why to close
        the connection after it ("": keep it open)."""
        request_id: Any = None
        try:
            if isinstance(request, RpcError):
                raise request
            if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or not isinstance(
                request.get("method"), str
            ):
                raise RpcError(-32600, "invalid request: expected a JSON-RPC 2.0 object with a method")
            request_id = request.get("id")
            params = request.get("params", {})
            if not isinstance(params, dict):
                raise RpcError(-32602, "params must be an object")
            result = await self.gate.invoke(session, request["method"], params)
        except RpcError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
            if exc.reason or exc.data:
                error["data"] = {**({"reason": exc.reason} if exc.reason else {}), **exc.data}
            return {"jsonrpc": "2.0", "id": request_id, "error": error}, (
                exc.reason or "" if isinstance(exc, Disconnect) else "")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}, ""
