"""Errors of the FHIR REST interface: each an OperationOutcome with an HTTP status that fits.

A method-table call's refusal (:class:`~ehrnode.api.rpc.RpcError`) becomes one here by its
code and reason: bad parameters 400, an unknown credential 401, a role that does not allow the
call 403, nothing there 404, refused by the chain 409, too large 413, invalid FHIR 422, a full
mempool 429, an owner that could not serve or did not answer 503, an answer that did not verify
502. A pull the owner refused is 403 with its reason in ``details.text`` and the access log it
was logged under in ``diagnostics``.
"""

from __future__ import annotations

from typing import Any

from ..api.rpc import Disconnect, RpcError

#: Refusals by reason (the ``data.reason`` of the JSON-RPC API): HTTP status, OperationOutcome code.
_BY_REASON: dict[str, tuple[int, str]] = {
    "forbidden": (403, "forbidden"),
    "not_recording": (403, "not-supported"),
    "not_found": (404, "not-found"),
    "own_record": (400, "business-rule"),
    "too_large": (413, "too-costly"),
    "invalid_input": (422, "invalid"),
    "invalid_fhir": (422, "invalid"),
    "mempool_full": (429, "throttled"),
    "member_quota": (429, "throttled"),
    "api_staged": (429, "throttled"),
    "timeout": (503, "timeout"),
    "unreachable": (503, "transient"),
    "bad_answer": (502, "transient"),
    "unlogged": (502, "security"),
    "commitment_mismatch": (502, "security"),
    "not_json": (502, "security"),
    "integrity": (502, "security"),
    "vault_behind": (503, "transient"),
    "io": (503, "transient"),
    # The owner turned the request away before deciding (nothing on chain).
    "busy": (503, "transient"),
    "rate_limited": (429, "throttled"),
    "stale": (502, "transient"),
    "replayed": (502, "transient"),
    "bad_signature": (502, "security"),
    "malformed": (502, "exception"),
    "wrong_chain": (502, "exception"),
    "wrong_owner": (502, "exception"),
    "unknown_requester": (502, "exception"),
    "access_log_not_committed": (503, "transient"),
    "internal": (503, "transient"),
}

#: Why an owner refuses a pull, as its access log says (403, logged on chain); ``internal`` (the
#: owner could not read its vault) is logged too, but is the owner's failure: 503.
OWNER_REFUSALS = frozenset({"consent", "policy", "erased", "not_owner", "revoked", "expired"})


class FhirFailure(Exception):
    """A request refused: ``status``, OperationOutcome ``code``, what to tell the caller, and
    ``diagnostics`` (the access log of a refused pull, or where in the input the problem is)."""

    def __init__(self, status: int, code: str, text: str, *, diagnostics: str | None = None,
                 issues: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.text = text
        self.diagnostics = diagnostics
        self.issues = issues
        self.headers = headers or {}

    def outcome(self) -> dict[str, Any]:
        return self.issues_outcome(self.issues) if self.issues else operation_outcome(
            self.code, self.text, diagnostics=self.diagnostics)

    @staticmethod
    def issues_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": issues}


def issue(code: str, text: str, *, severity: str = "error", diagnostics: str | None = None,
          expression: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"severity": severity, "code": code, "details": {"text": text}}
    if diagnostics:
        found["diagnostics"] = diagnostics
    if expression:
        found["expression"] = [expression]
    return found


def operation_outcome(code: str, text: str, *, severity: str = "error",
                      diagnostics: str | None = None) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [issue(code, text, severity=severity,
                                                                 diagnostics=diagnostics)]}


def from_rpc(exc: RpcError) -> FhirFailure:
    """The FHIR refusal for a method-table call's error."""
    access = exc.data.get("access_tx")
    if isinstance(exc, Disconnect):
        return FhirFailure(401, "login", str(exc))
    if exc.code == -32602:
        return FhirFailure(400, "invalid", str(exc))
    if exc.code == -32601:
        return FhirFailure(404, "not-supported", str(exc))
    if isinstance(access, str):
        # The owner decided, and its decision is on chain: the reason, and where it is logged.
        if exc.reason in OWNER_REFUSALS:
            return FhirFailure(403, "forbidden", exc.reason, diagnostics=access)
        return FhirFailure(503, "transient", exc.reason or "unavailable", diagnostics=access)
    reason = exc.reason or ""
    if reason in OWNER_REFUSALS:
        return FhirFailure(403, "forbidden", reason, diagnostics=str(exc))
    status, code = _BY_REASON.get(reason, (409, "conflict"))
    return FhirFailure(status, code, str(exc), diagnostics=reason or None)
