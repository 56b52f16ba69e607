"""Serving the FHIR REST interface: hypercorn's HTTP/1.1 connection handling on the node's own trio
loop, with the node's TLS certificate when the local API uses TLS (clients check it against the
consortium CA).

The listener is the node's own, so the connections it holds are bounded: at most
``MAX_CONNECTIONS`` at once (more are closed at once and counted as the refusal
``fhir_connections``), each closed after ``KEEP_ALIVE`` seconds idle, ``HANDSHAKE`` seconds
without finishing its TLS handshake, or ``READ_TIMEOUT`` seconds without sending anything.
"""

from __future__ import annotations

import ssl
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from ..api.gate import Gate
from .app import FhirApp

#: Connections held at once, over every client.
MAX_CONNECTIONS = 512
KEEP_ALIVE = 30
HANDSHAKE = 10
#: Longer than the longest answer takes (a pull, or a batch waiting for its anchors to commit).
READ_TIMEOUT = 150


class FhirServer:
    """The FHIR REST interface of one node, at ``base`` (``http[s]://HOST:PORT/fhir``)."""

    def __init__(self, gate: Gate, base: str, tls: ssl.SSLContext | None) -> None:
        self.app = FhirApp(gate, base)
        self.base = base
        self.tls = tls
        self.log = gate.state.log
        self.refusals = gate.state.node.refusals
        self.connections = 0
        config = Config()
        # Requests are logged by the application (fhir.request), in the node's own log.
        config.accesslog = None
        config.errorlog = None
        config.include_server_header = False
        config.keep_alive_timeout = KEEP_ALIVE
        config.read_timeout = READ_TIMEOUT
        config.ssl_handshake_timeout = HANDSHAKE
        self._config = config
        self._asgi = ASGIWrapper(self.app)
        self._context = WorkerContext(None)

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[Any] = await trio.open_tcp_listeners(port, host=host)
        if self.tls is not None:
            listeners = [trio.SSLListener(listener, self.tls, https_compatible=True) for listener in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._connection, listeners))
            self.log.info("fhir.listening", base=self.base, address=f"{host}:{port}")
            task_status.started()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        if self.connections >= MAX_CONNECTIONS:
            self.refusals.refuse("fhir_connections", "local", trio.current_time(),
                                 detail=f"{self.connections} connections (at most {MAX_CONNECTIONS})")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            # TCPServer's annotation names a TLS stream; it serves a plain one as well.
            await TCPServer(self._asgi, self._config, self._context, ConnectionState({}),
                            stream).run()  # type: ignore[arg-type]
        finally:
            self.connections -= 1
