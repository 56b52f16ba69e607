"""A client of a node's local API (JSON-RPC 2.0 over websocket), used by the CLI and tests."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

from .config import NodeConfig
from .errors import EhrnodeError, ProtocolError, innermost
from .net.tls import client_context, require_name
from .users.store import ADMIN_USER, read_token

#: Replies come from the client's own node (authenticated): a large ingest's receipt can be many MB.
MAX_REPLY_BYTES = 256 * 1024 * 1024


class ApiError(EhrnodeError):
    """The node answered a request with an error; ``reason`` is the node's reason, if it gave one."""

    reason = "api"


@asynccontextmanager
async def _open_tls(config: NodeConfig, headers: list[tuple[bytes, bytes]],
                    timeout: float) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket to the node over TLS: its certificate from the consortium CA, naming this node,
    checked before the credential is sent."""
    assert config.tls is not None
    address = config.api_listen
    stream = None
    try:
        with trio.fail_after(timeout):
            stream = trio.SSLStream(await trio.open_tcp_stream(address.host, address.port),
                                    client_context(config.tls.ca), server_hostname=None)
            await stream.do_handshake()
            require_name(stream, config.name)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.BrokenResourceError):
            raise ApiError(f"TLS with the node at {address} failed: {exc.__cause__ or exc}", reason="tls") from exc
        if isinstance(exc, ProtocolError):
            raise ApiError(f"the node at {address} is not {config.name}: {exc}", reason="tls") from exc
        if isinstance(exc, trio.TooSlowError):
            raise ApiError(f"the node at {address} did not answer within {timeout:g} s",
                           reason="unreachable") from exc
        raise
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(timeout) as scope:
                ws = await trio_websocket.wrap_client_stream(nursery, stream, address.host, "/",
                                                             extra_headers=headers, max_message_size=MAX_REPLY_BYTES)
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)
                raise ApiError(f"the node at {address} did not answer within {timeout:g} s", reason="unreachable")
            try:
                yield ws
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        inner = innermost(group)
        if inner is group:
            raise
        raise inner from None  # as open_websocket does: the caller sees its own exception, not a group


def _closed(exc: trio_websocket.ConnectionClosed) -> ApiError:
    """The node closed the connection: 1008 carries why (``revoked``, ``credential_rotated``)."""
    reason = exc.reason
    why = (reason.reason or "closed") if reason is not None and reason.code == 1008 else "closed"
    detail = f"{reason.code} {reason.reason or reason.name}" if reason is not None else "no reason"
    return ApiError(f"the node closed the connection ({detail})", reason=why)


class ApiClient:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._notifications: deque[dict[str, Any]] = deque()
        self._awaiting: set[int] = set()  # requests sent whose reply was not taken yet
        self._early: dict[int, dict[str, Any]] = {}  # their replies, come while another was awaited

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: NodeConfig, *, user: str | None = None, credential: str | None = None,
                      timeout: float = 10.0) -> AsyncIterator[ApiClient]:
        """Connect as ``user`` with ``credential``; with neither, as the node's own admin (``api.token``)."""
        if credential is None:
            if user not in (None, ADMIN_USER):
                raise ApiError(f"no credential for user {user}: pass --credential FILE or set EHRNODE_CREDENTIAL",
                               reason="no_credential")
            credential, user = read_token(config.data_dir), ADMIN_USER
        headers = [(b"authorization", f"Bearer {credential}".encode())]
        if user is not None:
            headers.append((b"x-ehrnode-user", user.encode()))
        address = config.api_listen
        try:
            if config.tls is not None and config.tls.api:
                async with _open_tls(config, headers, timeout) as ws:
                    yield cls(ws)
                return
            async with trio_websocket.open_websocket(
                address.host, address.port, "/", use_ssl=False, connect_timeout=timeout,
                max_message_size=MAX_REPLY_BYTES, extra_headers=headers,
            ) as ws:
                yield cls(ws)
        except trio_websocket.ConnectionRejected as exc:
            reason = {401: "unauthorized", 403: "revoked", 429: "throttled"}.get(exc.status_code, "rejected")
            detail = (exc.body or b"").decode("utf-8", "replace").strip() or f"HTTP {exc.status_code}"
            raise ApiError(f"the node at {address} refused the connection: {detail}", reason=reason) from exc
        except (OSError, trio_websocket.HandshakeError) as exc:
            raise ApiError(f"cannot reach the node's API at {address}: {exc}", reason="unreachable") from exc

    async def call(self, method: str, /, **params: Any) -> Any:
        return await self.reply(await self.send(method, params))

    async def send(self, method: str, params: dict[str, Any] | str) -> int:
        """Send a request and answer its id, without waiting for its reply (:meth:`reply`): the
        caller may prepare its next request meanwhile. ``params`` may come encoded already, as the
        JSON text of an object (a large input, encoded once as its parts were sized): its caller
        encodes every value in it with ``json.dumps``, so nothing in it is taken as JSON unescaped."""
        if isinstance(params, str):
            if not (params.startswith("{") and params.endswith("}")):
                raise ValueError("encoded params must be the JSON text of an object")
            encoded = params
        else:
            encoded = json.dumps(params)
        request_id = next(self._ids)
        try:
            await self._ws.send_message(f'{{"jsonrpc": "2.0", "id": {request_id}, "method": {json.dumps(method)}, '
                                        f'"params": {encoded}}}')
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from exc
        self._awaiting.add(request_id)
        return request_id

    async def reply(self, request_id: int) -> Any:
        """The result of request ``request_id`` (:meth:`send`); raises ApiError for an error reply.
        Replies are matched by id: those of other requests still awaited are kept for them."""
        try:
            reply = self._early.pop(request_id, None)
            while reply is None:
                try:
                    message = json.loads(await self._ws.get_message())
                except trio_websocket.ConnectionClosed as exc:
                    raise _closed(exc) from exc
                if message.get("id") == request_id:
                    reply = message
                elif message.get("id") in self._awaiting:
                    self._early[message["id"]] = message
                elif "method" in message:
                    self._notifications.append(message)  # kept for notifications()
        finally:
            self._awaiting.discard(request_id)  # taken, or given up: a late reply is dropped
        if "error" in reply:
            error = reply["error"]
            reason = (error.get("data") or {}).get("reason") or "api"
            raise ApiError(error.get("message", "error"), reason=reason)
        return reply["result"]

    async def notifications(self) -> AsyncIterator[dict[str, Any]]:
        """Notifications of a subscription, in order (including any that arrived during a call)."""
        while True:
            while self._notifications:
                yield self._notifications.popleft()
            try:
                message = json.loads(await self._ws.get_message())
            except trio_websocket.ConnectionClosed as exc:
                raise _closed(exc) from exc
            if "method" in message:
                yield message
