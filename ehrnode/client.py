"""A client of a node's local API (JSON-RPC 2.0 over websocket), used by the CLI and tests."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio_websocket

from .api import read_token
from .config import NodeConfig
from .errors import EhrnodeError


#: Replies come from the client's own node (authenticated): a large ingest's receipt can be many MB.
MAX_REPLY_BYTES = 256 * 1024 * 1024


class ApiError(EhrnodeError):
    """The node answered a request with an error; ``reason`` is the node's reason, if it gave one."""

    reason = "api"


class ApiClient:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._notifications: deque[dict[str, Any]] = deque()

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: NodeConfig, *, timeout: float = 10.0) -> AsyncIterator[ApiClient]:
        token = read_token(config.data_dir)
        address = config.api_listen
        try:
            async with trio_websocket.open_websocket(
                address.host, address.port, "/", use_ssl=False, connect_timeout=timeout,
                max_message_size=MAX_REPLY_BYTES,
                extra_headers=[(b"authorization", f"Bearer {token}".encode())],
            ) as ws:
                yield cls(ws)
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionRejected) as exc:
            raise ApiError(f"cannot reach the node's API at {address}: {exc}", reason="unreachable") from exc

    async def call(self, method: str, **params: Any) -> Any:
        request_id = next(self._ids)
        await self._ws.send_message(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                                "params": params}))
        while True:
            reply = json.loads(await self._ws.get_message())
            if reply.get("id") == request_id:
                break
            if "method" in reply:
                self._notifications.append(reply)  # kept for notifications()
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
            message = json.loads(await self._ws.get_message())
            if "method" in message:
                yield message
