"""The local API: JSON-RPC 2.0 over a websocket on loopback, for the CLI and the hospital's systems.

Every client acts as one of the node's users (:mod:`ehrnode.users`): the
websocket opening request carries ``Authorization: Bearer <credential>`` and,
optionally, ``X-Ehrnode-User: <name>``. A wrong or missing credential is
refused with HTTP 401, a revoked user with 403, a throttled name with 429,
before any JSON is read, and logged as ``auth.denied``. The node's own admin
credential is ``<data_dir>/api.token`` (created 0600 on first start).

Each call is then checked against the user's role (``[users] roles``): a call
the role does not allow is refused with ``data.reason`` ``forbidden`` and
logged as ``auth.denied``; a user revoked or rotated while connected is
refused at their next call and disconnected. Transactions a call submits
carry the user's pseudonym. Methods:

``status``            ``{"node", "height", "head", "round", "peers", "mempool", ...}``
``tx.submit``         ``{"note": TEXT, "wait": bool, "timeout": seconds}`` -> ``{"tx_id", "height"}``
``tx.submit_batch``   ``{"notes": [TEXT, ...]}`` -> ``{"tx_ids": [...], "errors": [{"index", "reason"}]}``
``tx.get``            ``{"tx_id": HEX}`` -> ``{"tx_id", "height" (null until committed), "pending"}``
``block.get``         ``{"height": H}`` (default: the head) -> ``{"height", "id", "parent", "round", "txs"}``
``blocks.subscribe``  then one ``block.committed`` notification per committed block
``txs.wait``          ``{"tx_ids": [HEX, ...], "timeout": seconds}`` -> ``{"heights": {HEX: H or null}}``

Records (institutions only):

``records.stage``     ``{"items": [{"source", "resource"}, ...]}`` -> ``{"staged": N}``: holds FHIR
                      resources on this connection, so an input larger than one message is
                      still recorded all at once by the next ``records.add``
``records.add``       ``{"items": [...] (optional), "skip_invalid": bool}`` -> ``{"records":
                      [{"record_id", "patient", "empi" (null until the enrolment is committed),
                      "resource_type", "source", "position", "tx_id", "status"}], "skipped":
                      [{"source", "resource_type", "id", "reason"}]}``;
                      invalid input without ``skip_invalid`` is refused (``invalid_input``)
                      and nothing is written
``records.list``      ``{"empi": E}`` -> committed anchors for that patient, consortium-wide
``records.show``      ``{"record_id": HEX}`` -> this institution's record, raw and released
``records.kanon``     -> the k-anonymity reached by the released patients
``vault.verify``      ``{"decrypt": bool}`` -> ``{"ok", "entries", "problems", ...}``

EMPI:

``empi.of``           ``{"patients": [HEX, ...]}`` -> ``{HEX: EMPI or null}`` (this node's enrolment
                      ids, as ``records.add`` returns them; review and history show registry ids)
``empi.lookup``       ``{"patient": FHIR Patient}`` -> ``{"empi", "grade", "candidates"}`` (institutions)
``empi.review``       -> the potential-duplicate queue with field-level evidence
``empi.history``      ``{"empi": E}`` -> every change to that EMPI
``empi.link``         ``{"enrolment": HEX, "empi": E}``; ``empi.split`` ``{"enrolment"}``;
                      ``empi.not_duplicate`` ``{"a", "b"}``;
``empi.merge``        ``{"from": E, "into": E}``; ``empi.unmerge`` ``{"merge": TX_ID}``: signed by this
                      member, answered once committed: ``{"tx_id", "height", "status"}``; a link or
                      merge that needs other institutions' agreement adds ``"waiting": [MEMBER...]``
``empi.accept``       ``{"request": TX_ID}``: agree to another institution's held link or merge
``empi.requests``     -> held links and merges made by this member or waiting for it

Consent (recorded by an institution that has the patient):

``consent.grant``     ``{"empi", "to": MEMBER or "*", "purposes": [...] or ["*"], "scope": [TYPES] or
``consent.revoke``    ["*"], "until": ms (0: no end)}`` -> ``{"tx_id", "height", "status"}``
``consent.show``      ``{"empi": E}`` -> every grant and revocation, in chain order

Sharing:

``records.pull``      ``{"record_id", "purpose", "timeout"}`` -> the verified release ``{"record_id",
                      "owner", "purpose", "resource", "salt", "commitment", "access_tx", "height",
                      "emergency", "verified"}``; a refusal names the owner's reason and access log
``records.erase``     ``{"record_id", "reason"}`` (owner) -> ``{"tx_id", "height", "status"}``
``audit.trail``       ``{"empi": E}`` or ``{"record_id"}``, ``"fhir": bool`` -> events in chain order
                      (or a FHIR Bundle of AuditEvents)
``audit.disclosures`` ``{"empi": E}`` -> every access granted to the patient's records
``audit.trace``       ``{"leaked": {"resource", "salt"}}`` -> the record and everyone it was served to
``events.subscribe``  ``{"empis": [E, ...], "own": bool}`` then one ``event`` notification per event
``audit.trail``       also ``{"user": "INSTITUTION/PSEUDONYM"}`` (or the bare pseudonym): everything that
                      user did, every pull they made, every request to name them
``audit.whois``       ``{"pseudonym": P}`` -> the user of this institution behind it (name, role, status);
                      with ``"at": INSTITUTION, "case": TEXT``, asks that institution on chain
                      (``whois.request``), and opens its sealed ``whois.answer``

Users (admin):

``users.add``         ``{"name", "role", "empi" (patient roles)}`` -> the user and its ``credential``
                      (shown once)
``users.list``        -> every user (revoked ones too), without credentials
``users.revoke``      ``{"name"}``; ``users.rotate`` ``{"name"}`` -> a new ``credential``, the old one
                      stops working at once
``users.whoami``      (any user) -> the caller's name, role, pseudonym and permissions

Keys and membership:

``keys.status``       -> the epochs, who opened each, whom its key was sealed to, which keys this
                      member holds (and why not, under ``unreadable``)
``keys.rotate``       (admin) -> ``{"tx_id", "height", "epoch", "starts"}``: the next epoch, now
``consortium.members``   -> ``{"epoch", "starts", "quorum", "running_epoch", "members": [...]}``
``consortium.proposals`` ``{"status": open|adopted|lapsed}`` -> proposals, their voters and the votes
                      needed
``consortium.propose`` (admin) ``{"change": add|remove|rotate-key, "name", "reason", and for add and
                      rotate-key "signing_key", "sealing_key" (hex), "address", "role" (add)}`` ->
                      ``{"tx_id", "height", "status", "proposal"}``
``consortium.vote``   (admin) ``{"proposal": HEX}`` -> the same; ``proposal.status`` says whether it
                      was adopted

Errors follow JSON-RPC: -32700 parse error, -32600 invalid request, -32601
unknown method, -32602 bad params, -32000 refused by the node (``data.reason``
says why, e.g. ``mempool_full``). A bad request gets an error; the connection
stays open.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from .codec import MAX_UINT
from .config import Address, Member
from .errors import (
    AdmissionError,
    CodecError,
    ConfigError,
    CryptoError,
    EhrnodeError,
    FhirError,
    IntegrityError,
    PullError,
    SchemaError,
    innermost,
)
from .ledger.empi_registry import scoped_enrolment
from .ledger.transactions import CHANGES, CONSENT_PURPOSES, EMPI_PATTERN, ENROLMENT_SIZE, KINDS, Transaction
from .logs import get_logger
from .records import fhir
from .sharing import audit
from .sharing.events import Subscription
from .sharing.whois import WhoisError
from .users.auth import (
    FAILURE_SLOTS,
    FREE_FAILURES,
    MAX_DELAY,
    MAX_WAITING_FAILURES,
    Outcome,
    Throttle,
    authenticate,
    bearer,
    claimed_key,
)
from .users.roles import ALWAYS, METHODS, PATIENT_METHODS, Role
from .users.store import ADMIN_USER, MIN_TOKEN_CHARS, TOKEN_FILE, User, UserError, pseudonym_bytes

if TYPE_CHECKING:
    from .node import Node

MAX_REQUEST_BYTES = 4 << 20
MAX_WAIT = 120.0
MAX_BATCH = 1000
#: FHIR input held between ``records.stage`` and ``records.add``: per connection (resources, and
#: memory once parsed, as :func:`parsed_size` bounds it), and memory over all connections at once.
#: Parsed JSON takes 3-28 times the bytes it came in (Synthea about 4), so it is what is counted.
MAX_STAGED = 200_000
MAX_STAGED_BYTES = 512 * 1024 * 1024
MAX_STAGED_TOTAL = 1024 * 1024 * 1024
#: Connections not authenticated yet (a local process cannot exhaust the node's descriptors),
#: and connections in all.
MAX_UNAUTHENTICATED = 64
MAX_CONNECTIONS = 512
#: Requests larger than this are parsed a few at a time (each may take ~100 MB once parsed).
LARGE_REQUEST = 64 * 1024
LARGE_PARSES = 4


def _parse(raw: str | bytes) -> Any:
    """A request's JSON, or the RpcError to answer it with."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return RpcError(-32700, f"parse error: {exc}")


def parsed_size(text: str | bytes) -> int:
    """An upper bound, in bytes, of the memory ``json.loads(text)`` takes: each object, array,
    key, value and string charged what CPython spends on it. Counts characters only (fast); a
    bracket or quote inside a string is charged too, which errs on the safe side."""
    def count(char: str) -> int:
        return text.count(char.encode() if isinstance(text, bytes) else char)  # type: ignore[arg-type]

    return (2 * len(text) + 184 * count("{") + 64 * count("[") + 64 * count(":") + 40 * count(",")
            + 28 * count('"'))


class _Staged:
    """One connection's FHIR input waiting for ``records.add``."""

    def __init__(self) -> None:
        self.items: list[fhir.Item] = []
        self.bytes = 0
        self.message_bytes = 0  # of the request being handled


class RpcError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class _Disconnect(RpcError):
    """Refused because the caller's credential is no longer valid: the connection closes after the reply."""


def _pseudonym_param(value: Any) -> bytes:
    try:
        return pseudonym_bytes(value if isinstance(value, str) else "")
    except (UserError, ValueError) as exc:
        raise RpcError(-32602, f"user: {exc}") from exc


def _hex_param(value: Any, name: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise RpcError(-32602, f"{name} must be {2 * size} hexadecimal characters")
    return raw


def _empi_param(value: Any, name: str) -> str:
    if not isinstance(value, str) or not EMPI_PATTERN.match(value):
        raise RpcError(-32602, f"{name} must be an EMPI (E and 24 base32 characters)")
    return value


def _timeout_param(params: dict[str, Any], default: float = 30.0) -> float:
    timeout = params.get("timeout", default)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_WAIT:
        raise RpcError(-32602, f"timeout must be in (0, {MAX_WAIT}] seconds")
    return float(timeout)


def read_token(data_dir: Path) -> str:
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CryptoError(f"cannot read API token {path}: {exc.strerror} (has the node been started?)") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise CryptoError(f"API token {path} is empty or truncated (restart the node to create a new one)")
    return token


@dataclass(eq=False)
class _Session:
    """One authenticated connection: who, and the credential they proved (checked again at every call)."""

    name: str
    secret: bytes
    user: User
    ws: trio_websocket.WebSocketConnection
    nursery: trio.Nursery


class ApiServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.users = node.users
        self.roles = node.roles
        self.throttle = Throttle()
        self._failing = trio.CapacityLimiter(FAILURE_SLOTS)
        self.log = get_logger(node=node.name)
        self._throttle_logged: dict[str, float] = {}
        self.staged_total = 0  # bytes of FHIR input staged over all connections (parsed size)
        self._sessions: set[_Session] = set()
        self._unauthenticated = 0
        self._connections = 0
        self._large_parses = trio.CapacityLimiter(LARGE_PARSES)

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._connection, port, host=host))
            self.log.info("api.listening", address=f"{host}:{port}")
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
                    token, claimed = bearer(request.headers)
                    outcome = authenticate(self.users, self.throttle, token, claimed, trio.current_time())
                    if outcome.user is not None:
                        ws = await request.accept()
                        authenticated()
                if outcome.user is None:
                    self._denied(outcome, claimed)
                    # Answered late, a few at a time over the whole API: wrong answers come slowly however
                    # many guess at once. Past a queue of them, a failure is just closed: no socket is held.
                    if self._failing.statistics().tasks_waiting >= MAX_WAITING_FAILURES:
                        nursery.cancel_scope.cancel()
                        return
                    with trio.move_on_after(MAX_DELAY + 10):
                        async with self._failing:
                            await trio.sleep(outcome.delay)
                        headers = [(b"retry-after", str(int(outcome.delay) + 1).encode())] \
                            if outcome.status == 429 else []
                        await request.reject(outcome.status, extra_headers=headers,
                                             body=f"{outcome.message}\n".encode())
                    nursery.cancel_scope.cancel()
                    return
                user = outcome.user
                session = _Session(user.name, user.secret, user, ws, nursery)
                self._sessions.add(session)
                try:
                    await self._session(ws, nursery, session)
                finally:
                    self._sessions.discard(session)
                nursery.cancel_scope.cancel()
        except trio.Cancelled:
            raise
        except Exception as group:  # noqa: BLE001 - one client's failure must not stop the API
            exc = innermost(group)
            if isinstance(exc, trio.BrokenResourceError):  # a client that does not speak TLS, or gave up
                self.log.info("api.tls_failed", error=str(exc.__cause__ or exc))
            elif not isinstance(exc, (ConnectionClosed, trio.TooSlowError, trio_websocket.HandshakeError, OSError)):
                self.log.warning("api.error", error=repr(exc))
        finally:
            authenticated()
            self._connections -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def _denied(self, outcome: Outcome, claimed: str | None) -> None:
        self.node.m_auth_denied.inc()
        key = claimed_key(claimed)
        if outcome.failures > FREE_FAILURES:
            # A flood against one name is logged once a second, with its count, not once per attempt.
            now = trio.current_time()
            if now - self._throttle_logged.get(key, -1e9) < 1.0:
                return
            if len(self._throttle_logged) > 10_000:
                self._throttle_logged.clear()
            self._throttle_logged[key] = now
        self.log.warning("auth.denied", reason=outcome.reason, user=key if claimed is not None else None,
                         failures=outcome.failures, throttled=outcome.status == 429, detail=outcome.message)

    def _permit(self, session: _Session, method: str, params: dict[str, Any]) -> User:
        """The caller, if still active with the same credential and allowed this call; RpcError if not."""
        user = self.users.get(session.name)
        if user is None or not user.active or user.secret != session.secret:
            why = "revoked" if user is None or not user.active else "credential_rotated"
            self.node.m_auth_denied.inc()
            self.log.warning("auth.denied", reason=why, user=session.name, method=method)
            raise _Disconnect(-32000, f"user {session.name}: {why.replace('_', ' ')}; reconnect with a valid "
                                      "credential", reason=why)
        if method in ALWAYS:
            return user
        role = self.roles.get(user.role)
        purpose = params.get("purpose") if method == "records.pull" else None
        problem = None
        if role is None:
            problem = f"role {user.role} is not in {self.roles.source}"
        elif not role.permits(method, purpose if isinstance(purpose, str) else None):
            problem = f"user {user.name} (role {user.role}) may not call {method}" + (
                f" for {purpose}" if isinstance(purpose, str) else "")
        elif role.patient:
            problem = self._patient_problem(user, method, params)
        if problem is not None:
            self.node.m_auth_denied.inc()
            self.log.warning("auth.denied", reason="forbidden", user=user.name, role=user.role, method=method,
                             detail=problem)
            raise RpcError(-32000, problem, reason="forbidden")
        return user

    def _patient_problem(self, user: User, method: str, params: dict[str, Any]) -> str | None:
        """Why a patient's call does not stay within their own EMPI (None: it does)."""
        if method not in PATIENT_METHODS:
            return f"user {user.name} is a patient: {method} does not name the patient"
        if method == "audit.trail" and (params.get("record_id") is not None or params.get("user") is not None):
            return f"user {user.name} is a patient: ask for the trail by their own EMPI"
        empi = params.get("empi")
        if not isinstance(empi, str) or user.empi is None:
            return f"user {user.name} is a patient: name their own EMPI"
        if empi == user.empi:
            return None
        registry = self.node.state.empi
        current = registry.resolve(None, empi) if EMPI_PATTERN.match(empi) else None
        if current is not None and current == registry.resolve(None, user.empi):
            return None
        return f"user {user.name} is a patient: {empi} is not their EMPI"

    async def _session(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery,
                       session: _Session) -> None:
        staged = _Staged()
        try:
            while True:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed:
                    return
                staged.message_bytes = parsed_size(raw)
                if len(raw) > LARGE_REQUEST:
                    async with self._large_parses:  # parsed a few at a time; handled as any other
                        request = _parse(raw)
                else:
                    request = _parse(raw)
                del raw
                reply, close = await self._dispatch(request, ws, nursery, staged, session)
                await ws.send_message(json.dumps(reply))
                if close:
                    await ws.aclose(1008, close)
                    return
        finally:
            self._release(staged)

    def _release(self, staged: _Staged) -> None:
        self.staged_total -= staged.bytes
        staged.items.clear()
        staged.bytes = 0

    async def _dispatch(self, request: Any, ws: Any, nursery: trio.Nursery, staged: _Staged,
                        session: _Session) -> tuple[dict[str, Any], str]:
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
            method = request["method"]
            if method not in METHODS:
                raise RpcError(-32601, f"unknown method {method!r}")
            user = self._permit(session, method, params)
            if method == "audit.whois" and params.get("at") not in (None, self.node.name):
                result = await self._whois_elsewhere(params, user)
            elif method.startswith("users.") or method == "audit.whois":
                result = self._users_call(method, params, user, session)
            elif method.startswith(("audit.", "events.")) or method in ("records.pull", "records.erase"):
                result = await self._sharing_call(method, params, ws, nursery, user)
            elif method.startswith(("records.", "vault.")):
                result = await self._records_call(method, params, staged, user)
            elif method.startswith("empi."):
                result = await self._empi_call(method, params, user)
            elif method.startswith("consent."):
                result = await self._consent_call(method, params, user)
            else:
                result = await self._call(method, params, ws, nursery, user)
        except RpcError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
            if exc.reason:
                error["data"] = {"reason": exc.reason}
            return {"jsonrpc": "2.0", "id": request_id, "error": error}, (
                exc.reason or "" if isinstance(exc, _Disconnect) else "")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}, ""

    async def _call(self, method: str, params: dict[str, Any], ws: Any, nursery: trio.Nursery, user: User) -> Any:
        node = self.node
        if method == "status":
            return node.status()
        if method == "block.get":
            height = params.get("height")
            if height is not None and (not isinstance(height, int) or isinstance(height, bool) or height < 0):
                raise RpcError(-32602, "height must be a non-negative integer")
            if height is not None and height > MAX_UINT:
                raise RpcError(-32602, "height out of range")
            block = node.block_view(height)
            if block is None:
                raise RpcError(-32000, f"no committed block at height {height}", reason="not_found")
            return block
        if method == "tx.submit":
            note = params.get("note")
            if not isinstance(note, str):
                raise RpcError(-32602, "note must be a string")
            timeout = _timeout_param(params)
            try:
                tx = node.submit_note(note, user.pseudonym)
            except AdmissionError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            except CodecError as exc:
                raise RpcError(-32602, f"invalid note: {exc}", reason="invalid") from exc
            height = await node.wait_committed(tx.id, float(timeout)) if params.get("wait") else None
            if params.get("wait") and height is None:
                raise RpcError(-32000, f"transaction {tx.id.hex()} not committed within {timeout} s",
                               reason="timeout")
            return {"tx_id": tx.id.hex(), "height": height}
        if method == "tx.submit_batch":
            notes = params.get("notes")
            if not isinstance(notes, list) or not 0 < len(notes) <= MAX_BATCH or not all(
                isinstance(n, str) for n in notes
            ):
                raise RpcError(-32602, f"notes must be a list of 1..{MAX_BATCH} strings")
            tx_ids: list[str | None] = []
            errors = []
            for index, note in enumerate(notes):
                try:
                    tx_ids.append(node.submit_note(note, user.pseudonym).id.hex())
                except AdmissionError as exc:
                    tx_ids.append(None)
                    errors.append({"index": index, "reason": exc.reason})
                except CodecError:
                    tx_ids.append(None)
                    errors.append({"index": index, "reason": "invalid"})
            return {"tx_ids": tx_ids, "errors": errors}
        if method == "tx.get":
            tx_id = params.get("tx_id")
            raw = _hex_param(tx_id, "tx_id", 32)
            return {"tx_id": tx_id, "height": node.state.tx_height(raw), "pending": raw in node.mempool}
        if method == "txs.wait":
            ids = params.get("tx_ids")
            if not isinstance(ids, list) or not 0 < len(ids) <= 100_000:
                raise RpcError(-32602, "tx_ids must be a list of 1..100000 transaction ids")
            raw_ids = [_hex_param(i, "tx_ids[]", 32) for i in ids]
            timeout = _timeout_param(params)
            heights: dict[str, int | None] = {}
            with trio.move_on_after(timeout):
                for tx_id, raw_id in zip(ids, raw_ids, strict=True):
                    heights[tx_id] = await node.wait_committed(raw_id, MAX_WAIT)
            for tx_id, raw_id in zip(ids, raw_ids, strict=True):
                heights.setdefault(tx_id, node.state.tx_height(raw_id))
            return {"heights": heights}
        if method == "keys.status":
            return node.epoch_view()
        if method == "keys.rotate":
            try:
                tx = node.rotate_epoch_key(user.pseudonym)
            except AdmissionError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            result = await self._committed(method, tx, params)
            return {**result, "epoch": tx.body["epoch"], "starts": result["height"] + 1}
        if method.startswith("consortium."):
            return await self._consortium_call(method, params, user)
        if method == "blocks.subscribe":
            channel = node.subscribe()
            nursery.start_soon(self._forward, channel, ws, "block.committed")
            return {"subscribed": "block.committed"}
        raise RpcError(-32601, f"unknown method {method!r}")

    async def _empi_call(self, method: str, params: dict[str, Any], user: User) -> Any:
        node, registry = self.node, self.node.state.empi
        if method == "empi.of":
            patients = params.get("patients")
            if not isinstance(patients, list) or len(patients) > 100_000:
                raise RpcError(-32602, "patients must be a list of enrolment ids")
            # This node's own enrolment ids, as records.add returns them.
            return {p: registry.empi_of(scoped_enrolment(node.name, _hex_param(p, "patients[]", ENROLMENT_SIZE)))
                    for p in patients}
        if method == "empi.review":
            return registry.review_queue()
        if method == "empi.history":
            return registry.history(_empi_param(params.get("empi"), "empi"))
        if method == "empi.requests":
            return registry.requests(node.name)
        if method == "empi.lookup":
            patient = params.get("patient")
            if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
                raise RpcError(-32602, "patient must be a FHIR Patient resource")
            if node.records is None:
                raise RpcError(-32000, f"{node.name} holds no consortium key: ask an institution",
                               reason="not_recording")
            return await node.records.lookup(patient)
        bodies: dict[str, Callable[[], dict[str, Any]]] = {
            "empi.link": lambda: {"enrolment": _hex_param(params.get("enrolment"), "enrolment", ENROLMENT_SIZE),
                                  "empi": _empi_param(params.get("empi"), "empi")},
            "empi.split": lambda: {"enrolment": _hex_param(params.get("enrolment"), "enrolment", ENROLMENT_SIZE)},
            "empi.not_duplicate": lambda: {"a": _hex_param(params.get("a"), "a", ENROLMENT_SIZE),
                                           "b": _hex_param(params.get("b"), "b", ENROLMENT_SIZE)},
            "empi.merge": lambda: {"from": _empi_param(params.get("from"), "from"),
                                   "into": _empi_param(params.get("into"), "into")},
            "empi.unmerge": lambda: {"merge": _hex_param(params.get("merge"), "merge", 32)},
            "empi.accept": lambda: {"request": _hex_param(params.get("request"), "request", 32)},
        }
        if method not in bodies:
            raise RpcError(-32601, f"unknown method {method!r}")
        result = await self._submit_and_wait(method, bodies[method](), params, user)
        held = registry.request(bytes.fromhex(result["tx_id"]))
        if held is not None:
            result["waiting"] = held["waiting"]
        return result

    async def _consent_call(self, method: str, params: dict[str, Any], user: User) -> Any:
        if method == "consent.show":
            return self.node.state.consent.entries(_empi_param(params.get("empi"), "empi"))
        if method not in ("consent.grant", "consent.revoke"):
            raise RpcError(-32601, f"unknown method {method!r}")
        purposes = params.get("purposes", ["*"])
        scope = params.get("scope", ["*"])
        until = params.get("until", 0)
        if not isinstance(until, int) or isinstance(until, bool) or not 0 <= until <= MAX_UINT:
            raise RpcError(-32602, "until must be a time in milliseconds (0: no end)")
        body = {"epoch": 0, "empi": _empi_param(params.get("empi"), "empi"), "grantee": params.get("to"),
                "purposes": purposes, "scope": scope, "until": until}
        try:
            KINDS[method](body)
        except SchemaError as exc:
            raise RpcError(-32602, str(exc)) from exc
        return await self._submit_and_wait(method, body, params, user)

    async def _sharing_call(self, method: str, params: dict[str, Any], ws: Any, nursery: trio.Nursery,
                            user: User) -> Any:
        node = self.node
        if method == "records.pull":
            record_id = _hex_param(params.get("record_id"), "record_id", 16)
            purpose = params.get("purpose")
            if purpose not in CONSENT_PURPOSES:
                raise RpcError(-32602, f"purpose must be one of {', '.join(CONSENT_PURPOSES)}")
            try:
                pulled = await node.puller.pull(record_id, purpose, _timeout_param(params, 60.0),
                                                user=user.pseudonym, role=user.role)
            except PullError as exc:
                message = str(exc) + (f" (access log {exc.access_tx.hex()})" if exc.access_tx else "")
                raise RpcError(-32000, message, reason=exc.reason) from exc
            except IntegrityError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            return pulled.view()
        if method == "records.erase":
            record_id = _hex_param(params.get("record_id"), "record_id", 16)
            reason = params.get("reason")
            if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
                raise RpcError(-32602, "reason must be a non-empty text of at most 2000 characters")
            if node.records is None:
                raise RpcError(-32000, f"{node.name} holds no records", reason="not_recording")
            try:
                tx = await node.records.erase(record_id, reason.strip(), user.pseudonym)
            except KeyError as exc:
                raise RpcError(-32000, f"no record {record_id.hex()} in this institution's vault",
                               reason="not_found") from exc
            except EhrnodeError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            height = await node.wait_committed(tx.id, _timeout_param(params))
            return {"tx_id": tx.id.hex(), "height": height, "status": node.state.tx_status(tx.id) or "pending"}
        try:
            if method == "audit.trail":
                empi = params.get("empi")
                record = params.get("record_id")
                actor = params.get("user")
                institution = None
                if isinstance(actor, str) and "/" in actor:
                    institution, _, actor = actor.partition("/")
                events = audit.trail(node.state, empi=_empi_param(empi, "empi") if empi is not None else None,
                                     record=_hex_param(record, "record_id", 16) if record is not None else None,
                                     user=_pseudonym_param(actor) if actor is not None else None,
                                     institution=institution)
                return audit.audit_bundle(events, node.name) if params.get("fhir") is True else events
            if method == "audit.disclosures":
                return audit.disclosures(node.state, _empi_param(params.get("empi"), "empi"))
            if method == "audit.trace":
                leaked = params.get("leaked")
                if not isinstance(leaked, dict):
                    raise RpcError(-32602, "leaked must be the served record: {resource, salt, ...}")
                return audit.trace_leak(node.state, leaked)
        except audit.AuditError as exc:
            raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        if method == "events.subscribe":
            empis = params.get("empis", [])
            if not isinstance(empis, list) or len(empis) > 1000:
                raise RpcError(-32602, "empis must be a list of at most 1000 EMPIs")
            own = params.get("own", not empis)
            if not isinstance(own, bool):
                raise RpcError(-32602, "own must be true or false")
            subscription = Subscription(frozenset(_empi_param(e, "empis[]") for e in empis), own)
            try:
                channel = node.subscribe_events(subscription)
            except AdmissionError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            nursery.start_soon(self._forward, channel, ws, "event")
            return {"subscribed": "event", "empis": sorted(subscription.empis), "own": own}
        raise RpcError(-32601, f"unknown method {method!r}")

    async def _consortium_call(self, method: str, params: dict[str, Any], user: User) -> Any:
        node = self.node
        if method == "consortium.members":
            return node.members_view()
        if method == "consortium.proposals":
            status = params.get("status")
            if status not in (None, "open", "adopted", "lapsed"):
                raise RpcError(-32602, "status must be open, adopted or lapsed")
            return {"proposals": [_proposal_view(p) for p in node.state.governance.proposals(status=status)]}
        try:
            if method == "consortium.vote":
                tx = node.vote(_hex_param(params.get("proposal"), "proposal", 32), user.pseudonym)
            elif method == "consortium.propose":
                change, name, reason = params.get("change"), params.get("name"), params.get("reason", "")
                if change not in CHANGES:
                    raise RpcError(-32602, f"change must be one of {', '.join(CHANGES)}")
                if not isinstance(name, str) or not isinstance(reason, str):
                    raise RpcError(-32602, "name and reason must be strings")
                member = None
                if change != "remove":
                    current = node.state.membership.get(name)
                    role = params.get("role", current.role if current else None)
                    if role not in ("institution", "regulator"):
                        raise RpcError(-32602, "role must be institution or regulator")
                    try:
                        member = Member(name, role, _hex_param(params.get("signing_key"), "signing_key", 32),
                                        _hex_param(params.get("sealing_key"), "sealing_key", 32),
                                        Address.parse(params.get("address", str(current.address) if current else None),
                                                      "address"))
                    except ConfigError as exc:
                        raise RpcError(-32602, str(exc)) from exc
                tx = node.propose(change, name, reason=reason, member=member, actor=user.pseudonym)
            else:
                raise RpcError(-32601, f"unknown method {method!r}")
        except AdmissionError as exc:
            raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        except SchemaError as exc:
            raise RpcError(-32602, str(exc), reason=exc.reason) from exc
        result = await self._committed(method, tx, params)
        view = node.state.governance.proposals_by_id(tx.body.get("proposal", tx.id))
        return {**result, "proposal": _proposal_view(view) if view else None}

    async def _submit_and_wait(self, method: str, body: dict[str, Any], params: dict[str, Any], user: User) -> Any:
        """Sign ``body`` as a ``method`` transaction by ``user``; answer once it is committed, or why not."""
        try:
            tx = self.node.submit(method, body, user.pseudonym)
        except AdmissionError as exc:
            raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        return await self._committed(method, tx, params)

    async def _committed(self, method: str, tx: Transaction, params: dict[str, Any]) -> dict[str, Any]:
        """Wait for ``tx``; its height once committed valid, or why not."""
        node = self.node
        height = await node.wait_committed(tx.id, _timeout_param(params))
        status = node.state.tx_status(tx.id)
        if status is None:
            raise RpcError(-32000, f"transaction {tx.id.hex()} not committed in time", reason="timeout")
        if status != "ok":
            raise RpcError(-32000, f"{method} refused by the chain: {status}", reason=status.partition(":")[2])
        return {"tx_id": tx.id.hex(), "height": height, "status": status}

    async def _records_call(self, method: str, params: dict[str, Any], staged: _Staged, user: User) -> Any:
        records = self.node.records
        if method == "records.list":
            empi = params.get("empi")
            if not isinstance(empi, str) or not 0 < len(empi) <= 64:
                raise RpcError(-32602, "empi must be a non-empty string")
            return self.node.records_list(empi)
        if records is None:
            raise RpcError(-32000, f"{self.node.name} does not record: it is not an institution with records keys",
                           reason="not_recording")
        if method in ("records.stage", "records.add"):
            items = params.get("items", [])
            if not isinstance(items, list):
                raise RpcError(-32602, "items must be a list of {source, resource}")
            for index, entry in enumerate(items):
                if not (isinstance(entry, dict) and isinstance(entry.get("source"), str)
                        and isinstance(entry.get("resource"), dict)):
                    raise RpcError(-32602, f"items[{index}] must be {{source: string, resource: object}}")
            size = staged.message_bytes if items else 0
            if (len(staged.items) + len(items) > MAX_STAGED or staged.bytes + size > MAX_STAGED_BYTES
                    or self.staged_total + size > MAX_STAGED_TOTAL):
                self.node.refusals.refuse("api_staged", user.name, trio.current_time(),
                                          detail=f"{len(staged.items) + len(items)} resources, "
                                                 f"{(staged.bytes + size) >> 20} MiB parsed")
                self._release(staged)
                raise RpcError(-32000, f"input too large to record at once (at most {MAX_STAGED} resources, "
                                       f"{MAX_STAGED_BYTES >> 20} MiB per input once parsed, "
                                       f"{MAX_STAGED_TOTAL >> 20} MiB staged on this node); staged input dropped; "
                                       "record it in parts", reason="too_large")
            staged.items.extend(fhir.Item(entry["source"], entry["resource"]) for entry in items)
            staged.bytes += size
            self.staged_total += size
            if method == "records.stage":
                return {"staged": len(staged.items)}
            batch = list(staged.items)
            self._release(staged)
            if not batch:
                raise RpcError(-32602, "nothing to record: no items given or staged")
            try:
                outcome = await records.record(batch, skip_invalid=params.get("skip_invalid") is True,
                                               actor=user.pseudonym)
            except FhirError as exc:
                self.log.info("records.refused", reason=exc.reason, resources=len(batch))
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            except EhrnodeError as exc:
                # Disk full, a vault behind the chain, ...: the caller hears why; nothing was written.
                self.log.error("records.failed", reason=exc.reason, error=str(exc))
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
            rows = [r.view() for r in outcome.records]
            for row in rows:
                row["empi"] = self.node.state.empi.empi_of(scoped_enrolment(self.node.name,
                                                                            bytes.fromhex(row["patient"])))
            return {"records": rows, "skipped": outcome.skipped}
        if method == "records.show":
            record_id = _hex_param(params.get("record_id"), "record_id", 16)
            try:
                return await records.show(record_id)
            except KeyError as exc:
                raise RpcError(-32000, f"no record {record_id.hex()} in this institution's vault",
                               reason="not_found") from exc
            except IntegrityError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        if method == "records.kanon":
            return await records.kanon_report()
        if method == "vault.verify":
            try:
                return await records.verify(decrypt=params.get("decrypt", True) is not False)
            except EhrnodeError as exc:
                raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        raise RpcError(-32601, f"unknown method {method!r}")

    def _users_call(self, method: str, params: dict[str, Any], user: User, session: _Session) -> Any:
        users = self.users
        if method == "users.whoami":
            role = self.roles.get(user.role)
            return {**user.view(), "permissions": sorted(role.allow) if role else []}
        if method == "users.list":
            return [u.view() for u in users.list()]
        if method == "audit.whois":
            pseudonym = _pseudonym_param(params.get("pseudonym"))
            found = users.whois(pseudonym)
            self.log.info("audit.whois", user=user.name, pseudonym=params["pseudonym"], found=found is not None)
            if found is None:
                raise RpcError(-32000, f"{params['pseudonym']} is not a user of {self.node.name}", reason="not_found")
            return {k: v for k, v in found.view().items() if k != "empi" or v is not None}
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError(-32602, "name must be a user name")
        mine = self.roles.get(user.role)
        assert mine is not None  # _permit checked it
        try:
            if method == "users.add":
                role_name = params.get("role")
                role = self.roles.get(role_name) if isinstance(role_name, str) else None
                if role is None:
                    raise RpcError(-32602, f"role must be one of {', '.join(sorted(self.roles.roles))} "
                                           f"({self.roles.source})")
                self._may_manage(user, mine, role, name)
                empi = params.get("empi")
                if empi is not None:
                    _empi_param(empi, "empi")
                added, credential = users.add(name, role.name, empi=empi, by=user.name, patient_role=role.patient)
                self.log.info("users.added", user=name, role=role.name, pseudonym=added.alias, by=user.name)
                return {**added.view(), "credential": credential}
            target = users.get(name)
            if target is not None:
                # The node's own admin, and users of a role gone from the roles file: only for who may do all.
                role = self.roles.get(target.role)
                self._may_manage(user, mine, self.roles.roles[ADMIN_USER] if role is None or name == ADMIN_USER
                                 else role, name)
            if method == "users.rotate":
                rotated, credential = users.rotate(name)
                self.log.info("users.rotated", user=name, by=user.name)
                self._drop_sessions(name, "credential_rotated", keep=session)
                return {**rotated.view(), "credential": credential}
            if method == "users.revoke":
                revoked = users.revoke(name)
                self.log.warning("users.revoked", user=name, by=user.name)
                self._drop_sessions(name, "revoked", keep=session)
                return revoked.view()
        except EhrnodeError as exc:
            raise RpcError(-32000, str(exc), reason=exc.reason) from exc
        except OSError as exc:  # api.token could not be rewritten (disk full, permissions)
            self.log.error("users.failed", user=name, method=method, error=str(exc))
            raise RpcError(-32000, f"cannot write the new credential: {exc}", reason="io") from exc
        raise RpcError(-32601, f"unknown method {method!r}")

    def _may_manage(self, user: User, mine: Role, role: Role, name: str) -> None:
        """Refuse handing out, rotating or revoking more power than the caller's own role has."""
        if not mine.includes(role):
            self.node.m_auth_denied.inc()
            self.log.warning("auth.denied", reason="forbidden", user=user.name, role=user.role,
                             detail=f"manage {name} (role {role.name})")
            raise RpcError(-32000, f"user {user.name} (role {user.role}) may not manage users of role {role.name}, "
                                   "which may do more than their own", reason="forbidden")

    async def _whois_elsewhere(self, params: dict[str, Any], user: User) -> Any:
        """Ask another institution, on chain, who one of its pseudonyms is (the answer is sealed to us)."""
        at, case = params.get("at"), params.get("case")
        if not isinstance(at, str) or at not in {m.name for m in self.node.genesis.members}:
            raise RpcError(-32602, "at must be a member of the consortium")
        if not isinstance(case, str) or not case.strip() or len(case) > 128:
            raise RpcError(-32602, "case must name what the request is for (at most 128 characters)")
        pseudonym = _pseudonym_param(params.get("pseudonym"))
        self.log.info("audit.whois_asked", user=user.name, at=at, pseudonym=params["pseudonym"], case=case)
        try:
            return await self.node.whois.ask(at, pseudonym, case.strip(), actor=user.pseudonym,
                                             timeout=_timeout_param(params))
        except WhoisError as exc:
            raise RpcError(-32000, str(exc), reason=exc.reason) from exc

    def _drop_sessions(self, name: str, why: str, keep: _Session) -> None:
        """Close ``name``'s open connections (subscriptions included) with code 1008 and ``why``, but not
        the caller's own: the caller hears the answer first and is refused at their next call."""
        for session in list(self._sessions):
            if session.name == name and session is not keep:
                session.nursery.start_soon(self._close, session, why)

    async def _close(self, session: _Session, why: str) -> None:
        with trio.move_on_after(5):
            await session.ws.aclose(1008, why)
        session.nursery.cancel_scope.cancel()

    async def _forward(self, channel: trio.MemoryReceiveChannel[dict[str, Any]], ws: Any, method: str) -> None:
        async with channel:
            try:
                async for note in channel:
                    await ws.send_message(json.dumps({"jsonrpc": "2.0", "method": method, "params": note}))
            except ConnectionClosed:
                return


def _proposal_view(proposal: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in proposal.items()}
