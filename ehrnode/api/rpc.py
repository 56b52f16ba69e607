"""JSON-RPC plumbing shared by every handler: errors, parsing, and checking parameters."""

from __future__ import annotations

import json
from typing import Any

from ..ledger.transactions import EMPI_PATTERN
from ..users.store import UserError, pseudonym_bytes

MAX_REQUEST_BYTES = 4 << 20
#: The longest any call waits (for a commit, a pull) before it answers.
MAX_WAIT = 120.0


class RpcError(Exception):
    """A JSON-RPC error: -32700 parse error, -32600 invalid request, -32601 unknown method,
    -32602 bad params, -32000 refused by the node (``reason`` says why; ``data``, what else the
    caller is told, such as the access log a refused pull was logged under)."""

    def __init__(self, code: int, message: str, reason: str | None = None,
                 data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.data = data or {}


class Disconnect(RpcError):
    """Refused because the caller's credential is no longer valid: the connection closes after the reply."""


def refused(exc: Exception, reason: str | None = None) -> RpcError:
    """An error of the node (-32000) carrying the exception's message and reason."""
    return RpcError(-32000, str(exc), reason=reason or getattr(exc, "reason", None))


def parse(raw: str | bytes) -> Any:
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
        return text.count(char.encode()) if isinstance(text, bytes) else text.count(char)

    return (2 * len(text) + 184 * count("{") + 64 * count("[") + 64 * count(":") + 40 * count(",")
            + 28 * count('"'))


def hex_param(value: Any, name: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise RpcError(-32602, f"{name} must be {2 * size} hexadecimal characters")
    return raw


def empi_param(value: Any, name: str) -> str:
    if not isinstance(value, str) or not EMPI_PATTERN.match(value):
        raise RpcError(-32602, f"{name} must be an EMPI (E and 24 base32 characters)")
    return value


def timeout_param(params: dict[str, Any], default: float = 30.0) -> float:
    timeout = params.get("timeout", default)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_WAIT:
        raise RpcError(-32602, f"timeout must be in (0, {MAX_WAIT}] seconds")
    return float(timeout)


def pseudonym_param(value: Any) -> bytes:
    try:
        return pseudonym_bytes(value if isinstance(value, str) else "")
    except (UserError, ValueError) as exc:
        raise RpcError(-32602, f"user: {exc}") from exc
