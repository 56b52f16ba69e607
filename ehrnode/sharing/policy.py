"""An institution's access policy: who may pull its records, for which purposes, of which types.

Theory of operation
-------------------
The owner of a record decides every pull of it in three steps, and the first
refusal stops the decision:

1. **Policy** (this file's ``[[allow]]`` rules): some rule must name the
   requester (by member name, ``role:<role>`` or ``*``), the purpose and the
   record's resource type, and, if the rule lists ``users``, the role the
   requesting user holds at their institution (``clinician``, ``researcher``,
   ...; signed into the request). Nothing else reads records: a request no
   rule covers is refused with reason ``policy``.
2. **Consent** (on chain, :mod:`ehrnode.ledger.consent`): the patient's last
   entry in force that covers the requester, purpose and type decides; with
   none, ``[consent] default_allow`` lists the purposes taken as allowed.
3. **Emergency**: a pull for purpose ``emergency`` that consent refuses is
   still granted, and logged as ``emergency_override``, when
   ``[consent] emergency_override`` allows it: ``missing`` overrides only the
   absence of a consent entry, ``revoked`` overrides a revocation too.

``[whois] requesters`` names the members (by name, ``role:<role>`` or ``*``)
this institution tells, when they ask on chain, which of its users is behind
a pseudonym (:mod:`ehrnode.sharing.whois`); by default the regulator.

The file is checked when the node starts: an unknown setting, purpose or role,
or a malformed resource type name, stops the node with the file and the place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ROLES, load_settings
from ..errors import ConfigError
from ..ledger.consent import Decision
from ..ledger.requests import ROLE_PATTERN
from ..ledger.transactions import CONSENT_PURPOSES

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}\Z")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
OVERRIDES = ("none", "missing", "revoked")


@dataclass(frozen=True)
class Rule:
    requesters: frozenset[str]
    purposes: frozenset[str]
    resource_types: frozenset[str]
    users: frozenset[str] = frozenset({"*"})  # roles of the requesting user

    def covers(self, requester: str, role: str, user_role: str, purpose: str, resource_type: str) -> bool:
        return (bool({"*", requester, f"role:{role}"} & self.requesters)
                and bool({"*", purpose} & self.purposes)
                and bool({"*", resource_type} & self.resource_types)
                and bool({"*", user_role} & self.users))


@dataclass(frozen=True)
class Verdict:
    granted: bool
    reason: str  # an access.log reason: granted, emergency_override, policy, consent
    consent: bytes  # the consent entry it rests on (empty: the default, or none consulted)


@dataclass(frozen=True)
class AccessPolicy:
    source: str
    max_age_ms: int
    default_allow: frozenset[str]
    emergency_override: str
    rules: tuple[Rule, ...]
    whois: frozenset[str] = frozenset({"role:regulator"})

    def tells(self, requester: str, role: str) -> bool:
        """Whether this institution names its users to ``requester`` (a member with ``role``)."""
        return bool({"*", requester, f"role:{role}"} & self.whois)

    def allows(self, requester: str, role: str, user_role: str, purpose: str, resource_type: str) -> bool:
        return any(rule.covers(requester, role, user_role, purpose, resource_type) for rule in self.rules)

    def decide(self, requester: str, role: str, user_role: str, purpose: str, resource_type: str,
               consent: Any) -> Verdict:
        """Policy, then consent, then the emergency override, for a pull by a ``user_role`` user of
        ``requester`` (a member with ``role``).

        ``consent(default: bool) -> Decision`` asks the chain's consent registry.
        """
        if not self.allows(requester, role, user_role, purpose, resource_type):
            return Verdict(False, "policy", b"")
        decision: Decision = consent(purpose in self.default_allow)
        cited = decision.tx_id or b""
        if decision.allowed:
            return Verdict(True, "granted", cited)
        if purpose == "emergency" and (
                (self.emergency_override == "missing" and decision.reason == "default")
                or self.emergency_override == "revoked"):
            return Verdict(True, "emergency_override", cited)
        return Verdict(False, "consent", cited)


def load_policy(path: Path | None = None) -> AccessPolicy:
    """Load and check a policy file; None loads the packaged default. Raises ConfigError."""
    return _build(*load_settings(path, __package__, "default_policy.toml", "access policy"))


def _build(doc: dict[str, Any], source: str) -> AccessPolicy:
    def fail(where: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {problem}")

    unknown = set(doc) - {"requests", "consent", "allow", "whois"}
    if unknown:
        raise fail("top level", f"unknown table(s) {', '.join(sorted(unknown))}")
    requests = _table(doc, "requests", fail)
    consent = _table(doc, "consent", fail)
    if set(requests) - {"max_age_seconds"}:
        raise fail("[requests]", f"unknown setting(s) {', '.join(sorted(set(requests) - {'max_age_seconds'}))}")
    if set(consent) - {"default_allow", "emergency_override"}:
        raise fail("[consent]", "unknown setting(s) "
                   f"{', '.join(sorted(set(consent) - {'default_allow', 'emergency_override'}))}")
    max_age = requests.get("max_age_seconds", 60)
    if not isinstance(max_age, int) or isinstance(max_age, bool) or not 1 <= max_age <= 3600:
        raise fail("[requests] max_age_seconds", "an integer from 1 to 3600")
    default_allow = _strings(consent.get("default_allow", []), "[consent] default_allow", fail)
    for purpose in default_allow:
        if purpose not in CONSENT_PURPOSES:
            raise fail("[consent] default_allow", f"unknown purpose {purpose!r} ({', '.join(CONSENT_PURPOSES)})")
    override = consent.get("emergency_override", "missing")
    if override not in OVERRIDES:
        raise fail("[consent] emergency_override", f"one of {', '.join(OVERRIDES)}, got {override!r}")
    rules_raw = doc.get("allow", [])
    if not isinstance(rules_raw, list):
        raise fail("allow", "expected [[allow]] tables")
    rules = []
    for index, raw in enumerate(rules_raw):
        where = f"[[allow]] #{index + 1}"
        if not isinstance(raw, dict):
            raise fail(where, "expected a table")
        if not {"requesters", "purposes", "resource_types"} <= set(raw) <= {
                "requesters", "purposes", "resource_types", "users"}:
            raise fail(where, "needs requesters, purposes and resource_types (and optionally users)")
        requesters = _strings(raw["requesters"], f"{where} requesters", fail)
        for requester in requesters:
            _check_requester(requester, f"{where} requesters", fail)
        purposes = _strings(raw["purposes"], f"{where} purposes", fail)
        for purpose in purposes:
            if purpose != "*" and purpose not in CONSENT_PURPOSES:
                raise fail(f"{where} purposes", f"unknown purpose {purpose!r} ({', '.join(CONSENT_PURPOSES)})")
        types = _strings(raw["resource_types"], f"{where} resource_types", fail)
        for resource_type in types:
            if resource_type != "*" and not _RESOURCE_TYPE.match(resource_type):
                raise fail(f"{where} resource_types", f"{resource_type!r} is not a FHIR resource type name")
        users = _strings(raw.get("users", ["*"]), f"{where} users", fail)
        for user_role in users:
            if user_role != "*" and not ROLE_PATTERN.fullmatch(user_role):
                raise fail(f"{where} users", f"{user_role!r} is not a user role name")
        rules.append(Rule(frozenset(requesters), frozenset(purposes), frozenset(types), frozenset(users)))
    whois = _table(doc, "whois", fail)
    if set(whois) - {"requesters"}:
        raise fail("[whois]", f"unknown setting(s) {', '.join(sorted(set(whois) - {'requesters'}))}")
    tellers = _strings(whois.get("requesters", ["role:regulator"]), "[whois] requesters", fail)
    for requester in tellers:
        _check_requester(requester, "[whois] requesters", fail)
    return AccessPolicy(source, max_age * 1000, frozenset(default_allow), override, tuple(rules),
                        frozenset(tellers))


def _check_requester(requester: str, where: str, fail: Any) -> None:
    if requester == "*" or _NAME.match(requester):
        return
    if not (requester.startswith("role:") and requester[5:] in ROLES):
        raise fail(where, f"{requester!r}: a member name, role:<{'|'.join(ROLES)}> or *")


def _table(doc: dict[str, Any], key: str, fail: Any) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise fail(f"[{key}]", "expected a table")
    return value


def _strings(value: Any, where: str, fail: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(where, "expected a list of strings")
    return value
