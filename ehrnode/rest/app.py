"""The FHIR R4 REST interface's application: each interaction a call (or two) through the
method table, as the JSON-RPC API makes them, for the user whose credential the request carries.

| interaction | method-table call |
|---|---|
| ``GET metadata`` | none (public: what is implemented) |
| ``POST Patient/$match`` | ``empi.lookup`` |
| ``GET DocumentReference?patient.identifier=`` | ``records.list`` |
| ``GET {ResourceType}/{record_id}`` | ``records.pull`` (purpose from ``X-Purpose-Of-Use``) |
| ``GET AuditEvent?patient.identifier=`` / ``?entity=`` | ``audit.trail`` |
| ``GET Consent?patient.identifier=`` | ``consent.show`` |
| ``POST Consent`` | ``consent.grant`` (permit) / ``consent.revoke`` (deny) |
| ``POST`` a batch or transaction Bundle | ``records.add`` |

So roles, the patient-role binding, limits and logging are the API's own. Every request is
logged as ``fhir.request`` (method, path, status, user, milliseconds); every error is an
OperationOutcome (:mod:`.outcome`). Bodies are read up to ``MAX_BODY_BYTES``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..api.call import MAX_STAGED_TOTAL, Session
from ..api.gate import Gate
from ..api.methods import BY_NAME
from ..api.rpc import RpcError, parsed_size
from ..errors import innermost
from ..limits import Holdings
from ..records import fhir
from . import resources as r
from .outcome import FhirFailure, from_rpc, issue, operation_outcome

#: The largest Bundle read (a few thousand resources); larger ones get 413. Other bodies (a
#: Consent, $match's Parameters) are at most ``MAX_SMALL_BODY``.
MAX_BODY_BYTES = 16 << 20
MAX_SMALL_BODY = 1 << 20
#: How long a client may take to send its body.
BODY_SECONDS = 60
#: Bundles parsed at once, each in a worker thread (a 16 MiB one takes seconds and its size
#: several times over in memory): the node's loop and memory are not theirs to take.
BUNDLE_PARSERS = 1
FHIR_JSON = "application/fhir+json"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_FORMATS = frozenset({"json", *_JSON_TYPES})
_RECORD_ID = re.compile(r"[0-9a-f]{32}")
_ENTRY = re.compile(r"entry\[(\d+)\]")
#: The parameters of $match taken, and what each must be.
_MATCH_PARAMETERS = {"resource": "a Patient resource", "onlyCertainMatches": "a valueBoolean",
                     "count": "a positive valueInteger"}
#: Results a $match gives at most.
MAX_MATCHES = 100
#: Requests handled at once; more are answered 503 at once (counted as the refusal ``fhir_requests``).
MAX_IN_FLIGHT = 256
#: Of those, one user's: one client cannot take every slot (429, the refusal ``fhir_user_requests``).
MAX_IN_FLIGHT_PER_USER = 64

try:
    _VERSION = version("ehrnode")
except PackageNotFoundError:  # run from a source tree that was not installed
    _VERSION = "unknown"

Handler = Callable[[Request, Session], Awaitable[Response]]


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status, headers=headers,
                    media_type=FHIR_JSON)


class FhirApp:
    """The ASGI application serving ``[base]/...`` for one node, through ``gate``."""

    def __init__(self, gate: Gate, base: str) -> None:
        self.gate = gate
        self.state = gate.state
        self.base = base.rstrip("/")
        self._read_types = fhir.patient_data_types()
        self._in_flight = 0
        self._by_user = Holdings()
        self._parsers = trio.CapacityLimiter(BUNDLE_PARSERS)
        routes = [
            Route("/fhir/metadata", self._public(self.metadata), methods=["GET"]),
            Route("/fhir/Patient/$match", self._authenticated(self.match), methods=["POST"]),
            Route("/fhir/DocumentReference", self._authenticated(self.documents), methods=["GET"]),
            Route("/fhir/AuditEvent", self._authenticated(self.audit_events), methods=["GET"]),
            Route("/fhir/Consent", self._authenticated(self.consents), methods=["GET"]),
            Route("/fhir/Consent", self._authenticated(self.consent_create), methods=["POST"]),
            Route("/fhir", self._authenticated(self.bundle), methods=["POST"]),
            Route("/fhir/", self._authenticated(self.bundle), methods=["POST"]),
            Route("/fhir/{rtype}/{rid}", self._authenticated(self.read), methods=["GET"]),
        ]
        self.asgi = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)

    # --- the frame around every interaction ------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such path, method not allowed) as OperationOutcomes."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not-found", 405: "not-supported"}.get(status, "processing")
        text = (f"no FHIR interaction {request.method} {request.url.path} here (see {self.base}/metadata)"
                if status in (404, 405) else HTTPStatus(status).phrase)
        response = fhir_response(operation_outcome(code, text), status)
        self._logged(request, response, None, trio.current_time())
        return response

    def _public(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = trio.current_time()
            try:
                self._check_params(request, set())
                response = await handler(request)
            except FhirFailure as exc:
                response = _refusal(exc)
            self._logged(request, response, None, started)
            return response

        return endpoint

    def _authenticated(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if self._in_flight >= MAX_IN_FLIGHT:
                self.state.node.refusals.refuse("fhir_requests", "local", trio.current_time(),
                                                detail=f"{self._in_flight} in flight (at most {MAX_IN_FLIGHT})")
                response = _refusal(FhirFailure(503, "transient", "too many requests at once; retry shortly",
                                                headers={"retry-after": "1"}))
                self._logged(request, response, None, trio.current_time())
                return response
            self._in_flight += 1
            try:
                return await self._handle(request, handler)
            finally:
                self._in_flight -= 1

        return endpoint

    async def _handle(self, request: Request, handler: Handler) -> Response:
        started = trio.current_time()
        user: str | None = None
        try:
            outcome, _ = self.gate.authenticate(request.headers.raw)
            if outcome.user is None:
                # Answered late, a few at a time over the node, as on the JSON-RPC API.
                await self.gate.hold_refusal(outcome)
                code = {401: "login", 403: "forbidden", 429: "throttled"}.get(outcome.status, "security")
                headers = {"www-authenticate": 'Bearer realm="ehrnode"'} if outcome.status == 401 else {}
                if outcome.status == 429:
                    headers["retry-after"] = str(int(outcome.delay) + 1)
                raise FhirFailure(outcome.status, code, outcome.message, headers=headers)
            user = outcome.user.name
            if self._by_user.of(user) >= MAX_IN_FLIGHT_PER_USER:
                self.state.node.refusals.refuse("fhir_user_requests", user, trio.current_time(),
                                                detail=f"{self._by_user.of(user)} requests in flight "
                                                       f"(at most {MAX_IN_FLIGHT_PER_USER} a user)")
                raise FhirFailure(429, "throttled", f"user {user} has {MAX_IN_FLIGHT_PER_USER} requests in "
                                                    "flight; wait for their answers", headers={"retry-after": "1"})
            self._by_user.take(user)
            try:
                async with trio.open_nursery() as nursery:
                    session = Session(outcome.user, None, nursery)
                    try:
                        response = await handler(request, session)
                    except (FhirFailure, RpcError) as exc:  # answered here: a nursery would wrap it in a group
                        response = _refusal(exc)
                    finally:
                        self.state.release(session.staged)
            finally:
                self._by_user.release(user)
        except (FhirFailure, RpcError) as exc:
            response = _refusal(exc)
        except Exception as exc:  # one request's failure must not stop the interface: logged, answered 500
            self.state.log.error("fhir.error", method=request.method, path=request.url.path,
                                 error=repr(innermost(exc)), exc_info=exc)
            response = fhir_response(operation_outcome("exception", "internal error; see the node's log"), 500)
        self._logged(request, response, user, started)
        return response

    def _logged(self, request: Request, response: Response, user: str | None, started: float) -> None:
        self.state.log.info("fhir.request", method=request.method, path=request.url.path,
                            status=response.status_code, user=user,
                            ms=round((trio.current_time() - started) * 1000, 1))

    def _check_params(self, request: Request, allowed: set[str]) -> dict[str, str]:
        """The query's parameters (each at most once), refusing any this interaction does not take."""
        found: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key == "_format":
                if value not in _FORMATS:
                    raise FhirFailure(406, "not-supported", f"_format {value!r}: this server speaks {FHIR_JSON} only")
                continue
            if key not in allowed:
                raise FhirFailure(400, "not-supported", f"unknown search parameter {key!r} (this interaction takes "
                                                        f"{', '.join(sorted(allowed)) or 'none'})")
            if key in found:
                raise FhirFailure(400, "invalid", f"search parameter {key!r} given twice")
            found[key] = value
        return found

    async def _body(self, request: Request, limit: int = MAX_SMALL_BODY) -> bytes:
        """The request's body, at most ``limit`` bytes, sent within ``BODY_SECONDS``."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in _JSON_TYPES:
            raise FhirFailure(415, "not-supported", f"Content-Type must be {FHIR_JSON}, got {media or 'none'}")
        length = request.headers.get("content-length", "")
        too_large = FhirFailure(413, "too-costly", f"request body larger than {limit >> 20} MiB; send it in parts")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        with trio.move_on_after(BODY_SECONDS) as waited:
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
            except ClientDisconnect as exc:
                raise FhirFailure(400, "incomplete", "the client went away before its body was sent") from exc
        if waited.cancelled_caught:
            raise FhirFailure(408, "timeout", f"the body was not sent within {BODY_SECONDS} s")
        return b"".join(chunks)

    async def _json(self, request: Request) -> Any:
        """A small body's JSON."""
        return _parse(await self._body(request))

    def _empi(self, params: dict[str, str], name: str = "patient.identifier") -> str:
        system, bar, value = params[name].partition("|")
        if not bar or system != r.EMPI_SYSTEM or not value:
            raise FhirFailure(400, "invalid", f"{name} must be {r.EMPI_SYSTEM}|EMPI")
        return value

    # --- interactions --------------------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        return fhir_response(r.capability_statement(self.base, self.state.node.name, _VERSION, self._read_types,
                                                    _now_ms()))

    async def match(self, request: Request, session: Session) -> Response:
        self._check_params(request, set())
        body = await self._json(request)
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise FhirFailure(400, "invalid", "Patient/$match takes a Parameters resource")
        patient, only_certain, count = None, False, 10
        parameters = body.get("parameter")
        if not isinstance(parameters, list):
            raise FhirFailure(400, "required", "Parameters.parameter must list resource (a Patient)")
        for index, parameter in enumerate(parameters):
            name = parameter.get("name") if isinstance(parameter, dict) else None
            where = f"Parameters.parameter[{index}]"
            if name == "resource" and isinstance(parameter.get("resource"), dict):
                patient = parameter["resource"]
            elif name == "onlyCertainMatches" and isinstance(parameter.get("valueBoolean"), bool):
                only_certain = parameter["valueBoolean"]
            elif name == "count" and type(parameter.get("valueInteger")) is int and 0 < parameter["valueInteger"]:
                count = min(parameter["valueInteger"], MAX_MATCHES)
            elif name in _MATCH_PARAMETERS:
                raise FhirFailure(400, "invalid", f"{where}: {name} must be {_MATCH_PARAMETERS[name]}")
            else:
                raise FhirFailure(400, "invalid", f"{where}: {name!r} is not a parameter of $match taken here "
                                                  f"({', '.join(_MATCH_PARAMETERS)})")
        if patient is None or patient.get("resourceType") != "Patient":
            raise FhirFailure(400, "required", "$match needs the parameter resource, a Patient")
        problem = fhir.check_model(patient, "resource")
        if problem is not None:
            raise FhirFailure(422, "invalid", f"the Patient is not valid FHIR R4: {problem}")
        found = await self.gate.invoke(session, "empi.lookup", {"patient": patient})
        entries = r.match_entries(found, only_certain=only_certain, count=count)
        return fhir_response(r.searchset(entries, f"{self.base}/Patient/$match"))

    async def documents(self, request: Request, session: Session) -> Response:
        params = self._check_params(request, {"patient.identifier"})
        if "patient.identifier" not in params:
            raise FhirFailure(400, "required", "DocumentReference search needs "
                                               "patient.identifier=urn:ehrnode:empi|EMPI")
        anchors = await self.gate.invoke(session, "records.list", {"empi": self._empi(params)})
        entries = [{"resource": r.document_reference(a, self.base), "search": {"mode": "match"}} for a in anchors]
        return fhir_response(r.searchset(entries, str(request.url)))

    async def read(self, request: Request, session: Session) -> Response:
        self._check_params(request, set())
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        if rtype not in self._read_types:
            raise FhirFailure(404, "not-supported", f"{rtype!r} is not a resource type a record may be")
        if not _RECORD_ID.fullmatch(rid):
            raise FhirFailure(404, "not-found", f"{rtype}/{rid}: record ids are 32 lowercase hexadecimal characters")
        code = request.headers.get("x-purpose-of-use", "TREAT").strip()
        purpose = r.PURPOSE_BY_CODE.get(code)
        if purpose is None:
            raise FhirFailure(400, "code-invalid", f"X-Purpose-Of-Use {code[:40]!r} is not one of "
                                                   f"{', '.join(r.PURPOSE_BY_CODE)}")
        params = {"record_id": rid, "purpose": purpose, "timeout": 60.0}
        # Who may pull is decided before anything about the record is told.
        self.gate.permit(session, BY_NAME["records.pull"], params)
        anchors = self.state.node.state.anchors(record=bytes.fromhex(rid))
        if not anchors or anchors[0]["resource_type"] != rtype:
            raise FhirFailure(404, "not-found", f"no {rtype} record {rid} is anchored on the chain")
        pulled = await self.gate.invoke(session, "records.pull", params)
        return fhir_response(pulled["resource"], headers={"x-access-log": pulled["access_tx"]})

    async def audit_events(self, request: Request, session: Session) -> Response:
        params = self._check_params(request, {"patient.identifier", "entity"})
        if len(params) != 1:
            raise FhirFailure(400, "required", "AuditEvent search takes one of patient.identifier=urn:ehrnode:empi|EMPI"
                                               " or entity=RECORD_ID")
        if "entity" in params:
            system, bar, value = params["entity"].rpartition("|")
            if bar and system != r.RECORD_SYSTEM:
                raise FhirFailure(400, "invalid", f"entity must be a record id (or {r.RECORD_SYSTEM}|RECORD_ID)")
            query: dict[str, Any] = {"record_id": value}
        else:
            query = {"empi": self._empi(params)}
        bundle = await self.gate.invoke(session, "audit.trail", {**query, "fhir": True})
        entries = [{**entry, "search": {"mode": "match"}} for entry in bundle["entry"]]
        return fhir_response(r.searchset(entries, str(request.url)))

    async def consents(self, request: Request, session: Session) -> Response:
        params = self._check_params(request, {"patient.identifier"})
        if "patient.identifier" not in params:
            raise FhirFailure(400, "required", "Consent search needs patient.identifier=urn:ehrnode:empi|EMPI")
        found = await self.gate.invoke(session, "consent.show", {"empi": self._empi(params)})
        now = _now_ms()
        entries = [{"resource": r.consent_resource(e, now), "search": {"mode": "match"}} for e in found]
        return fhir_response(r.searchset(entries, str(request.url)))

    async def consent_create(self, request: Request, session: Session) -> Response:
        self._check_params(request, set())
        body = await self._json(request)
        if not isinstance(body, dict):
            raise FhirFailure(400, "invalid", "expected a Consent resource")
        problem = fhir.check_model(body, "body") if body.get("resourceType") == "Consent" else None
        if problem is not None:
            raise FhirFailure(422, "invalid", f"the Consent is not valid FHIR R4: {problem}")
        members = {m["name"] for m in self.state.node.members_view()["members"]}
        method, params = r.consent_params(body, members, _now_ms())
        try:
            result = await self.gate.invoke(session, method, params)
        except RpcError as exc:
            if exc.reason == "timeout" and "tx_id" in exc.data:
                # Submitted, not committed in time: it may still be. Say which transaction to look for.
                return fhir_response(operation_outcome(
                    "transient", f"submitted; not committed within the wait (transaction {exc.data['tx_id']})",
                    severity="warning"), 202, headers={"x-transaction": exc.data["tx_id"]})
            raise
        entry = {"empi": params["empi"], "action": "grant" if method == "consent.grant" else "revoke",
                 "grantor": self.state.node.name, "grantee": params["to"], "purposes": params["purposes"],
                 "scope": params["scope"], "until": params.get("until") or None, "time": _now_ms(),
                 "tx_id": result["tx_id"]}
        return fhir_response(r.consent_resource(entry, _now_ms()), 201, headers={"x-transaction": result["tx_id"]})

    async def bundle(self, request: Request, session: Session) -> Response:
        """A batch (each entry on its own) or transaction (all or nothing) of resources to record."""
        self._check_params(request, set())
        # Who may record, before a byte of a large body is read.
        self.gate.permit(session, BY_NAME["records.add"], {})
        if self.state.node.records is None:
            raise FhirFailure(403, "not-supported", f"{self.state.node.name} does not record: it is not an "
                                                    "institution with records keys")
        data = await self._body(request, MAX_BODY_BYTES)
        size = parsed_size(data)
        if self.state.staged_total + size > MAX_STAGED_TOTAL:
            raise FhirFailure(429, "throttled", "the node holds as much input as it may; retry shortly",
                              headers={"retry-after": "5"})
        self.state.staged_total += size  # held while it is parsed, as records.add counts staged input
        try:
            body, items, problems = await trio.to_thread.run_sync(_split_bundle, data, limiter=self._parsers)
        finally:
            self.state.staged_total -= size
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise FhirFailure(400, "invalid", "POST to the base takes a Bundle of type batch or transaction")
        kind = body.get("type")
        if kind not in ("batch", "transaction"):
            raise FhirFailure(422, "invalid", f"Bundle.type must be batch or transaction, got {str(kind)[:40]!r}")
        entries = body.get("entry")
        if not isinstance(entries, list) or not entries:
            raise FhirFailure(422, "required", "the Bundle has no entries")
        count, creates = len(entries), [_creates(entry) for entry in entries]
        del body, entries
        problems += [fhir.Problem(f"request entry[{i}]", None, None, f"Bundle.entry[{i}].request", why,
                                  "not_supported") for i, why in enumerate(creates) if why]
        refused = {_index(p.source) for p in problems}
        items = [item for item in items if _index(item.source) not in refused]
        if problems and (kind == "transaction" or not items):
            raise FhirFailure(422, "invalid", "nothing recorded", issues=[
                issue("invalid", str(p), expression=_expression(p.source)) for p in problems[:100]])
        session.staged.message_bytes = size
        del data
        added = await self.gate.invoke(session, "records.add", {
            "items": [{"source": item.source, "resource": item.resource} for item in items],
            "skip_invalid": kind == "batch", "wait": True, "timeout": 60.0})
        answers: dict[int, dict[str, Any]] = {}
        for row in added["records"]:
            answer: dict[str, Any] = {"status": "200 OK" if row["status"] == "already_recorded" else "201 Created",
                                      "location": f"{row['resource_type']}/{row['record_id']}"}
            if row["status"] != "already_recorded" and row.get("height") is None:
                answer["status"] = "202 Accepted"
                answer["outcome"] = operation_outcome(
                    "transient", f"recorded; its anchor (transaction {row['tx_id']}) is not committed yet",
                    severity="warning")
            answers[_index(row["source"])] = answer
        for skipped in added["skipped"]:
            not_data = skipped["reason"].startswith("not patient data")
            answers[_index(skipped["source"])] = {
                "status": "200 OK" if not_data else "422 Unprocessable Entity",
                "outcome": operation_outcome("informational" if not_data else "invalid", skipped["reason"],
                                             severity="information" if not_data else "error")}
        for problem in problems:
            answers[_index(problem.source)] = {"status": "422 Unprocessable Entity",
                                               "outcome": operation_outcome("invalid", str(problem))}
        return fhir_response({"resourceType": "Bundle", "type": f"{kind}-response", "entry": [
            {"response": answers.get(i, {"status": "422 Unprocessable Entity",
                                         "outcome": operation_outcome("invalid", "not recorded")})}
            for i in range(count)]})


def _creates(entry: Any) -> str | None:
    """Why an entry is not a plain create this interface carries out (None: it is one)."""
    request = entry.get("request") if isinstance(entry, dict) else None
    if request is None:
        return None
    if not isinstance(request, dict):
        return "request must be an object"
    method = request.get("method", "POST")
    if method not in ("POST", "PUT"):
        return f"{str(method)[:10]}: only creates (POST, or PUT of a new resource) are carried out"
    conditional = sorted(k for k in ("ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince") if k in request)
    if conditional:
        return f"conditional requests ({', '.join(conditional)}) are not supported"
    return None


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FhirFailure(400, "structure", f"the body is not valid JSON: {str(exc)[:200]}") from exc


def _split_bundle(data: bytes) -> tuple[Any, list[fhir.Item], list[fhir.Problem]]:
    """A Bundle's JSON, and its resources as intake reads them (in a worker thread)."""
    body = _parse(data)
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return body, [], []
    items, problems = fhir.read_value(body, "request")
    return body, items, problems


def _refusal(exc: FhirFailure | RpcError) -> Response:
    failure = from_rpc(exc) if isinstance(exc, RpcError) else exc
    return fhir_response(failure.outcome(), failure.status, failure.headers)


def _index(source: str) -> int:
    found = _ENTRY.search(source)
    return int(found.group(1)) if found else -1


def _expression(source: str) -> str | None:
    found = _ENTRY.search(source)
    return f"Bundle.entry[{found.group(1)}]" if found else None


def _now_ms() -> int:
    return int(time.time() * 1000)
