"""Who is calling: credentials at the websocket handshake, and failed guesses slowed down.

Theory of operation
-------------------
A client opens the local API with ``Authorization: Bearer <credential>`` and,
optionally, ``X-Ehrnode-User: <name>``. The credential's hash picks the user;
a name given must be that user's, so a credential copied into the wrong
script fails loudly instead of acting as someone else.

A correct credential is always accepted at once. Credentials are 256-bit
secrets: no rate of guessing can find one, so the throttle is there to make
guessing slow, visible and cheap to refuse, and it never locks a legitimate
user out (a lockout keyed on a name anyone can claim would let any local
process shut the admin out).

Failures are refused with a clear HTTP status (401 wrong or missing, 403
revoked, 429 once the name has failed ``FREE_FAILURES`` times), logged as
``auth.denied`` and answered only after a delay: ``FAILURE_DELAY`` at first,
then doubling with each further failure for the same claimed name (attempts
naming no user share one count), up to ``MAX_DELAY``. The delays are served
``FAILURE_SLOTS`` at a time over the whole API, so guessing in parallel
waits its turn too. A success clears the name's count; ``FORGET_AFTER``
seconds without a failure forget it.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass

from .store import USER_NAME, User, UserStore

FREE_FAILURES = 5
FAILURE_DELAY = 0.25
MAX_DELAY = 5.0
#: Failed handshakes being answered (delayed) at once, over the whole API, and waiting their turn;
#: failures beyond those are closed without an answer.
FAILURE_SLOTS = 4
MAX_WAITING_FAILURES = 64
FORGET_AFTER = 900.0
#: Claimed names tracked at once (the oldest are forgotten first).
MAX_TRACKED = 10_000
ANONYMOUS = "(no name)"
NOT_A_NAME = "(not a user name)"


@dataclass
class _Count:
    failures: int = 0
    last: float = 0.0


@dataclass(frozen=True)
class Outcome:
    user: User | None
    status: int  # HTTP status to refuse with (0: accepted)
    reason: str  # auth.denied reason
    message: str
    delay: float = 0.0  # how long to wait before refusing
    failures: int = 0  # recent failures for this name


class Throttle:
    def __init__(self) -> None:
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def failures(self, key: str, now: float) -> int:
        count = self._counts.get(key)
        return 0 if count is None or now - count.last > FORGET_AFTER else count.failures

    def fail(self, key: str, now: float) -> int:
        """Count one failure for ``key``; returns its recent failures."""
        count = self._counts.pop(key, None) or _Count()
        if now - count.last > FORGET_AFTER:
            count = _Count()
        count.failures += 1
        count.last = now
        self._counts[key] = count
        while len(self._counts) > MAX_TRACKED:
            self._counts.popitem(last=False)
        return count.failures

    def succeed(self, key: str) -> None:
        self._counts.pop(key, None)


def delay_for(failures: int) -> float:
    if failures < FREE_FAILURES:
        return FAILURE_DELAY
    return min(MAX_DELAY, FAILURE_DELAY * 2 ** (failures - FREE_FAILURES + 1))


def claimed_key(name: str | None) -> str:
    """What a claimed name is counted (and logged) under: never a credential pasted as a name."""
    if name is None:
        return ANONYMOUS
    return name if USER_NAME.fullmatch(name) else NOT_A_NAME


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
    key = claimed_key(name)
    user = store.by_token(token) if token else None
    if user is not None and user.active and (name is None or hmac.compare_digest(name.encode(),
                                                                                  user.name.encode())):
        throttle.succeed(key)
        return Outcome(user, 0, "", "")
    failures = throttle.fail(key, now)
    if not token:
        reason, status, message = "missing_credential", 401, "no credential: send Authorization: Bearer <credential>"
    elif user is None:
        reason, status, message = "bad_credential", 401, "wrong credential" + (
            f" for user {key}" if name is not None else "")
    elif not user.active:
        reason, status, message = "revoked", 403, f"user {user.name} is revoked"
    else:
        reason, status, message = "wrong_user", 401, f"this credential is not user {key}'s"
    delay = delay_for(failures)
    if failures >= FREE_FAILURES and status == 401:
        status = 429
        message += f"; {failures} failed attempts for {key}: each is answered after {delay:g} s"
    return Outcome(None, status, reason, message, delay, failures)
