"""Handlers of the node's users: who the caller is, and (for who may) adding, listing, rotating
and revoking users."""

from __future__ import annotations

from typing import Any

from ..errors import EhrnodeError
from ..users.roles import Role
from ..users.store import ADMIN_USER, User
from .call import Call
from .rpc import RpcError, empi_param, refused


async def users_whoami(call: Call) -> Any:
    role = call.api.roles.get(call.user.role)
    return {**call.user.view(), "permissions": sorted(role.allow) if role else []}


async def users_list(call: Call) -> Any:
    return [u.view() for u in call.api.users.list()]


async def users_add(call: Call) -> Any:
    name, mine = _target(call)
    role_name = call.params.get("role")
    role = call.api.roles.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        raise RpcError(-32602, f"role must be one of {', '.join(sorted(call.api.roles.roles))} "
                               f"({call.api.roles.source})")
    _may_manage(call, mine, role, name)
    empi = call.params.get("empi")
    if empi is not None:
        empi_param(empi, "empi")
    try:
        added, credential = call.api.users.add(name, role.name, empi=empi, by=call.user.name,
                                                patient_role=role.patient)
    except OSError as exc:
        raise _io(call, name, exc) from exc
    except EhrnodeError as exc:
        raise refused(exc) from exc
    call.api.log.info("users.added", user=name, role=role.name, pseudonym=added.alias, by=call.user.name)
    return {**added.view(), "credential": credential}


async def users_rotate(call: Call) -> Any:
    name = _managed(call)
    try:
        rotated, credential = call.api.users.rotate(name)
    except OSError as exc:
        raise _io(call, name, exc) from exc
    except EhrnodeError as exc:
        raise refused(exc) from exc
    call.api.log.info("users.rotated", user=name, by=call.user.name)
    call.api.drop_sessions(name, "credential_rotated", keep=call.session)
    return {**rotated.view(), "credential": credential}


async def users_revoke(call: Call) -> Any:
    name = _managed(call)
    try:
        revoked = call.api.users.revoke(name)
    except OSError as exc:
        raise _io(call, name, exc) from exc
    except EhrnodeError as exc:
        raise refused(exc) from exc
    call.api.log.warning("users.revoked", user=name, by=call.user.name)
    call.api.drop_sessions(name, "revoked", keep=call.session)
    return revoked.view()


def _io(call: Call, name: str, exc: OSError) -> RpcError:
    """The user store could not be written (disk full, permissions): say so, log it."""
    call.api.log.error("users.failed", user=name, method=call.method, error=str(exc))
    return RpcError(-32000, f"cannot write the new credential: {exc}", reason="io")


def _target(call: Call) -> tuple[str, Role]:
    """The user the call names, and the caller's own role."""
    name = call.params.get("name")
    if not isinstance(name, str):
        raise RpcError(-32602, "name must be a user name")
    mine = call.api.roles.get(call.user.role)
    assert mine is not None  # the server checked the caller's role
    return name, mine


def _managed(call: Call) -> str:
    """The named user, once the caller is found to hold every power of that user's role."""
    name, mine = _target(call)
    target = call.api.users.get(name)
    if target is not None:
        # The node's own admin, and users of a role gone from the roles file: only for who may do all.
        role = call.api.roles.get(target.role)
        _may_manage(call, mine, call.api.roles.roles[ADMIN_USER] if role is None or name == ADMIN_USER else role,
                    name)
    return name


def _may_manage(call: Call, mine: Role, role: Role, name: str) -> None:
    """Refuse handing out, rotating or revoking more power than the caller's own role has."""
    user: User = call.user
    if not mine.includes(role):
        call.node.m_auth_denied.inc()
        call.api.log.warning("auth.denied", reason="forbidden", user=user.name, role=user.role,
                             detail=f"manage {name} (role {role.name})")
        raise RpcError(-32000, f"user {user.name} (role {user.role}) may not manage users of role {role.name}, "
                               "which may do more than their own", reason="forbidden")
