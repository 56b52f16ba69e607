"""Serving the FHIR REST interface: hypercorn's trio server on the node's own loop, with the
node's TLS certificate when the local API uses TLS (clients check it against the consortium CA)."""

from __future__ import annotations

import ssl
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..api.gate import Gate
from .app import FhirApp


class _Config(Config):
    """Hypercorn's settings, serving TLS with a context made elsewhere (the node's) instead of files."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return self._context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


class FhirServer:
    """The FHIR REST interface of one node, at ``base`` (``http[s]://HOST:PORT/fhir``)."""

    def __init__(self, gate: Gate, base: str, tls: ssl.SSLContext | None) -> None:
        self.app = FhirApp(gate, base)
        self.base = base
        self.tls = tls
        self.log = gate.state.log

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = _Config(self.tls)
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        # Requests are logged by the application (fhir.request), in the node's own log.
        config.accesslog = None
        config.errorlog = None
        config.include_server_header = False
        # An idle connection is closed after 30 s; one that sends nothing for longer than the longest
        # answer takes (a pull or a batch waiting for its commit) is closed too.
        config.keep_alive_timeout = 30
        config.read_timeout = 150
        config.ssl_handshake_timeout = 10
        config.graceful_timeout = 3
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, self.app, config))
            self.log.info("fhir.listening", base=self.base, address=f"{host}:{port}")
            task_status.started()
