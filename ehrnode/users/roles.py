"""Roles: which local API calls each kind of user may make.

Theory of operation
-------------------
Every call on the local API is made by a user, and every user has one role.
A role is a list of permissions, read from a TOML file an institution can
change (``[users] roles`` in node.toml; the packaged default otherwise). A
permission is a method (``records.add``), a group (``consent.*``), ``*``, a
pull for one purpose of use (``records.pull:treatment``; ``records.pull``
alone allows every purpose), or the audit trail by one key
(``audit.trail:patient``, ``:record`` or ``:user``; ``audit.trail`` alone allows
all three).

A role marked ``patient = true`` is bound to one EMPI per user. Only methods
that name a patient may be allowed to it, and each call must name that
patient (or an EMPI merged with it): a patient lists their own records, reads
their own disclosures and records their own consent, and nothing else.

Which methods exist, which of them name a patient, and which every user may call
(``users.whoami``: who they are) is the API's method table's to say
(:mod:`ehrnode.api.methods`); the roles file is checked against it (a :class:`Catalogue`).

The file is checked when the node starts: an unknown method, purpose or
setting, a patient role allowed a method that names no patient, or a missing
``admin`` role stops the node with the file and the place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import load_settings
from ..errors import ConfigError
from ..ledger.requests import PURPOSES, ROLE_PATTERN

ADMIN = "admin"


@dataclass(frozen=True)
class Catalogue:
    """What a roles file may name: every method of the local API, and those that name one
    patient (the only ones a patient role may be allowed). The API's method table gives it."""

    methods: frozenset[str]
    patient: frozenset[str]
    always: frozenset[str] = frozenset()  # every user may call these (users.whoami)



@dataclass(frozen=True)
class Role:
    name: str
    allow: frozenset[str]
    patient: bool
    always: frozenset[str] = frozenset()  # the catalogue's methods every user may call

    def permits(self, method: str, purpose: str | None = None) -> bool:
        group = method.partition(".")[0] + ".*"
        if method in self.always or {"*", method, group} & self.allow:
            return True
        return purpose is not None and f"{method}:{purpose}" in self.allow

    def includes(self, other: Role) -> bool:
        """Whether this role may do everything ``other`` may (who may hand ``other`` out)."""
        if "*" in self.allow:
            return True
        for permission in other.allow:
            method, _, purpose = permission.partition(":")
            if permission == "*" or (permission.endswith(".*") and permission not in self.allow):
                return False
            if not permission.endswith(".*") and not self.permits(method, purpose or None):
                return False
        return True


@dataclass(frozen=True)
class Roles:
    source: str
    roles: dict[str, Role]

    def get(self, name: str) -> Role | None:
        return self.roles.get(name)


def load_roles(path: Path | None, catalogue: Catalogue) -> Roles:
    """Load and check a roles file against the API's ``catalogue``; None loads the packaged
    default. Raises ConfigError."""
    return _build(*load_settings(path, __package__, "default_roles.toml", "roles file"), catalogue)


#: The methods a permission may allow for one scope only (``records.pull:treatment``), and the scopes.
SCOPES: dict[str, tuple[str, ...]] = {"records.pull": PURPOSES, "audit.trail": ("patient", "record", "user")}


def _permission_ok(permission: str, methods: frozenset[str]) -> bool:
    if permission == "*" or permission in methods:
        return True
    if permission.endswith(".*"):
        return any(m.startswith(permission[:-1]) for m in methods)
    method, _, scope = permission.partition(":")
    return scope in SCOPES.get(method, ())


def _build(doc: dict[str, Any], source: str, catalogue: Catalogue) -> Roles:
    def fail(where: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {problem}")

    if set(doc) != {"roles"} or not isinstance(doc["roles"], dict):
        raise fail("top level", "expected only [roles.<name>] tables")
    roles: dict[str, Role] = {}
    for name, raw in doc["roles"].items():
        where = f"[roles.{name}]"
        if not ROLE_PATTERN.fullmatch(name):
            raise fail(where, "a role name is lower-case letters, digits, '-' or '_' (at most 32)")
        if not isinstance(raw, dict) or "allow" not in raw:
            raise fail(where, "needs allow (and optionally patient = true)")
        if set(raw) - {"allow", "patient"}:
            raise fail(where, f"unknown setting(s) {', '.join(sorted(set(raw) - {'allow', 'patient'}))}")
        allow = raw["allow"]
        if not isinstance(allow, list) or not all(isinstance(p, str) for p in allow):
            raise fail(f"{where} allow", "expected a list of strings")
        for permission in allow:
            if not _permission_ok(permission, catalogue.methods):
                raise fail(f"{where} allow", f"unknown permission {permission!r}")
        patient = raw.get("patient", False)
        if not isinstance(patient, bool):
            raise fail(f"{where} patient", "true or false")
        if patient:
            for permission in allow:
                if permission not in catalogue.patient:
                    raise fail(f"{where} allow", f"{permission!r}: a patient role may only be allowed methods "
                                                 f"that name the patient ({', '.join(sorted(catalogue.patient))})")
        roles[name] = Role(name, frozenset(allow), patient, catalogue.always)
    admin = roles.get(ADMIN)
    if admin is None or admin.patient or not all(admin.permits(m) for m in ("users.add", "users.rotate")):
        raise fail(f"[roles.{ADMIN}]", "the admin role must exist and be allowed users.* (the node's own "
                                       "credential belongs to it)")
    return Roles(source, roles)
