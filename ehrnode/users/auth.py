"""Who is calling: credentials at the websocket handshake, and brute force slowed down.

Theory of operation
-------------------
A client opens the local API with ``Authorization: Bearer <credential>`` and,
optionally, ``X-Ehrnode-User: <name>``. The credential's hash picks the user;
a name given must be that user's, so a credential copied into the wrong
script fails loudly instead of acting as someone else.

Failures are refused with a clear HTTP status (401 wrong or missing, 403
revoked, 429 throttled) and logged as ``auth.denied``. Each failure is
answered only after a short delay, and failures are counted per claimed
name (attempts without a name share one count): after ``FREE_FAILURES`` in
a row, that name is locked out for a time that doubles with every further
failure, up to ``MAX_LOCKOUT``. While locked out, attempts are refused
without being checked, so guessing cannot go faster than the lockout
allows; another user, who sends their own name, is not affected. A
success clears the count.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass

from .store import User, UserStore

FREE_FAILURES = 5
BASE_LOCKOUT = 1.0
MAX_LOCKOUT = 300.0
#: How long a failure is answered after (slows one connection guessing in a loop).
FAILURE_DELAY = 0.25
#: Failures are forgotten after this long without another.
FORGET_AFTER = 900.0
#: Claimed names tracked at once (the oldest are forgotten first).
MAX_TRACKED = 10_000
ANONYMOUS = "(no name)"


@dataclass
class _Count:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass(frozen=True)
class Outcome:
    user: User | None
    status: int  # HTTP status to refuse with (0: accepted)
    reason: str  # auth.denied reason
    message: str
    retry_after: float = 0.0


class Throttle:
    def __init__(self) -> None:
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def locked(self, key: str, now: float) -> float:
        """Seconds ``key`` stays locked out (0: not locked)."""
        count = self._counts.get(key)
        if count is None:
            return 0.0
        if now - count.last > FORGET_AFTER:
            del self._counts[key]
            return 0.0
        return max(0.0, count.locked_until - now)

    def fail(self, key: str, now: float) -> int:
        count = self._counts.pop(key, None) or _Count()
        if now - count.last > FORGET_AFTER:
            count = _Count()
        count.failures += 1
        count.last = now
        if count.failures >= FREE_FAILURES:
            count.locked_until = now + min(MAX_LOCKOUT, BASE_LOCKOUT * 2 ** (count.failures - FREE_FAILURES))
        self._counts[key] = count
        while len(self._counts) > MAX_TRACKED:
            self._counts.popitem(last=False)
        return count.failures

    def succeed(self, key: str) -> None:
        self._counts.pop(key, None)


def bearer(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The credential and claimed user name in an opening request's headers (None where absent)."""
    token = name = None
    for key, value in headers:
        lowered = key.lower()
        if lowered == b"authorization":
            scheme, _, rest = value.partition(b" ")
            if scheme.lower() == b"bearer":
                token = rest.strip().decode("utf-8", "replace")
        elif lowered == b"x-ehrnode-user":
            name = value.strip().decode("utf-8", "replace")[:64]
    return token, name


def authenticate(store: UserStore, throttle: Throttle, token: str | None, name: str | None,
                 now: float) -> Outcome:
    key = name or ANONYMOUS
    wait = throttle.locked(key, now)
    if wait > 0:
        return Outcome(None, 429, "throttled", f"too many failed attempts for {key}: retry in {wait:.0f} s",
                       wait)
    if not token:
        throttle.fail(key, now)
        return Outcome(None, 401, "missing_credential", "no credential: send Authorization: Bearer <credential>")
    user = store.by_token(token)
    if user is None:
        throttle.fail(key, now)
        return Outcome(None, 401, "bad_credential", "wrong credential" + (f" for user {name}" if name else ""))
    if not user.active:
        throttle.fail(key, now)
        return Outcome(None, 403, "revoked", f"user {user.name} is revoked")
    if name is not None and not hmac.compare_digest(name.encode(), user.name.encode()):
        throttle.fail(key, now)
        return Outcome(None, 401, "wrong_user", f"this credential is not user {name}'s")
    throttle.succeed(key)
    return Outcome(user, 0, "", "")
