"""What a handler gets: the call (its parameters and caller) and the API's shared state."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from ..logs import get_logger
from ..records import fhir
from ..records.service import RecordsService
from ..records.workers import Checked
from ..users.roles import Roles
from ..users.store import User
from .facade import NodeFacade
from .rpc import RpcError, timeout_param

#: FHIR input held between ``records.stage`` and ``records.add``: per connection (resources, and
#: memory once parsed, as :func:`.rpc.parsed_size` bounds it), and memory over all connections at
#: once. Parsed JSON takes 3-28 times the bytes it came in (Synthea about 4), so it is what is counted.
MAX_STAGED = 200_000
MAX_STAGED_BYTES = 512 * 1024 * 1024
MAX_STAGED_TOTAL = 1024 * 1024 * 1024
#: What validation ahead of staged input may hold at once, over all connections: the parsed size
#: of the parts being validated (counted until each validation ends, even once its input is
#: dropped) and the size of the results kept for ``records.add``. A part past it is left to
#: ``records.add``, as is every later part of that input: a client staging faster than the
#: workers validate, or dropping its input and staging again, cannot pile up work or memory.
MAX_CHECKING_AHEAD = 256 * 1024 * 1024


@dataclass(eq=False)
class StagedCheck:
    """The validation of one staged part, started as it was staged; ``records.add`` waits for it
    if it has begun, and cancels it if it is still waiting for its turn."""

    start: int  # where the part begins in the staged input
    items: list[fhir.Item]
    size: int  # parsed size
    #: The part staged before it (in the same input), which begins first, and the one before
    #: that, which ends first.
    previous: StagedCheck | None = None
    after: StagedCheck | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Its input was dropped or taken by ``records.add`` (``ApiState.release``).
    dropped: bool = False
    #: The size of its results, counted in ``ApiState.checking_ahead`` while they are held.
    held: int = 0
    #: Set once its validation has begun, or ended without beginning.
    began: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    #: Each item's canonical JSON or problem; None until done, and if it failed or was cancelled
    #: (``records.add`` then validates those items itself).
    results: list[Checked] | None = None


@dataclass
class Staged:
    """One connection's FHIR input waiting for ``records.add``."""

    items: list[fhir.Item] = field(default_factory=list)
    bytes: int = 0
    message_bytes: int = 0  # of the request being handled (its parsed size)
    checks: list[StagedCheck] = field(default_factory=list)
    #: How far checks cover the input, in order from its first item; -1 once a part was left out.
    checked_to: int = 0
    #: Staged Patients whose OPRF evaluations are still to be asked for ahead, and the scope of the
    #: one task that asks for them (None when it is not running).
    to_evaluate: list[fhir.Item] = field(default_factory=list)
    evaluation: trio.CancelScope | None = None

    def cancel_checks(self, *, started: bool) -> None:
        """Cancel the validations ahead still waiting for their turn, and with ``started`` the
        running ones too (their results are then never used)."""
        for check in self.checks:
            if started or not check.began.is_set():
                check.scope.cancel()


@dataclass(eq=False)
class Session:
    """One authenticated connection: who, the credential they proved (checked again at every
    call), its websocket (None for a FHIR REST request, which is a session of its own), the
    nursery its subscriptions run in, and its staged input."""

    user: User  # as authenticated; its credential is checked against the store at every call
    ws: trio_websocket.WebSocketConnection | None
    nursery: trio.Nursery
    staged: Staged = field(default_factory=Staged)

    @property
    def name(self) -> str:
        return self.user.name


class ApiState:
    """What the handlers share: the node, its users and roles, staged input, open sessions."""

    def __init__(self, node: NodeFacade, roles: Roles) -> None:
        self.node = node
        self.users = node.users
        self.roles = roles
        self.log = get_logger(node=node.name)
        self.staged_total = 0  # parsed size of the FHIR input staged over all connections
        #: What validation ahead holds over all connections: the parsed size of the parts being
        #: validated, and the size of the results kept for ``records.add``.
        self.checking_ahead = 0
        self.sessions: set[Session] = set()

    def release(self, staged: Staged, *, cancel_checks: bool = True) -> None:
        """Forget the staged input; its validations and OPRF evaluation ahead are cancelled,
        unless ``records.add`` is taking the input (the evaluation already asked for then goes on:
        ``records.add`` waits for it rather than asking again)."""
        if cancel_checks:
            staged.cancel_checks(started=True)
            if staged.evaluation is not None:
                staged.evaluation.cancel()  # dropped: evaluating its Patients would serve nobody
        staged.to_evaluate.clear()  # taken by records.add: it asks for the rest itself
        for check in staged.checks:
            check.dropped = True
            self.checking_ahead -= check.held
            check.held = 0
        self.staged_total -= staged.bytes
        staged.items.clear()
        staged.checks.clear()
        staged.checked_to = 0
        staged.bytes = 0

    def drop_sessions(self, name: str, why: str, keep: Session) -> None:
        """Close ``name``'s open connections (subscriptions included) with code 1008 and ``why``,
        but not the caller's own: the caller hears the answer first and is refused at their
        next call."""
        for session in list(self.sessions):
            if session.name == name and session is not keep:
                session.nursery.start_soon(self._close, session, why)

    async def _close(self, session: Session, why: str) -> None:
        if session.ws is not None:
            with trio.move_on_after(5):
                await session.ws.aclose(1008, why)
        session.nursery.cancel_scope.cancel()


@dataclass
class Call:
    """One call being handled."""

    method: str
    params: dict[str, Any]
    user: User
    session: Session
    api: ApiState

    @property
    def node(self) -> NodeFacade:
        return self.api.node

    def recording(self) -> RecordsService:
        """The node's records service; refused on a node that does not record (a regulator, or
        an institution set up without records keys). Methods marked ``institution`` in the table
        are refused so before their handler runs."""
        records = self.node.records
        if records is None:
            raise RpcError(-32000, f"{self.node.name} does not record: it is not an institution with records keys",
                           reason="not_recording")
        return records

    def timeout(self, default: float = 30.0) -> float:
        return timeout_param(self.params, default)

    def forward(self, channel: trio.MemoryReceiveChannel[dict[str, Any]], notification: str) -> None:
        """Send each item of ``channel`` to the caller as a ``notification``, for as long as the
        connection lives (a websocket's: there is nowhere else to send them)."""
        if self.session.ws is None:
            channel.close()
            raise RpcError(-32000, "subscriptions are served on the websocket API only", reason="unsupported")
        self.session.nursery.start_soon(_forward, channel, self.session.ws, notification)


async def _forward(channel: trio.MemoryReceiveChannel[dict[str, Any]], ws: trio_websocket.WebSocketConnection,
                   method: str) -> None:
    async with channel:
        try:
            async for note in channel:
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "method": method, "params": note}))
            # The node closed the feed (a subscriber too far behind): say so rather than go quiet.
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "method": f"{method}.ended", "params": {}}))
        except ConnectionClosed:
            return


#: A handler: the call's result (JSON-ready), or an RpcError.
Handler = Callable[[Call], Awaitable[Any]]

__all__ = ["ApiState", "Call", "Handler", "RpcError", "Session", "Staged"]
