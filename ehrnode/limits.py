"""What one peer, one member or one address may hold or cause, and how a refusal shows.

Theory of operation
-------------------
Every shared resource a node offers to others is split so that one of them
cannot take it all: handshake slots per source address, pull slots per member,
access-log refusals per member and minute, mempool room per member, local API
connections before authentication. Each place keeps its own bound (the numbers
live beside the code that enforces them); this module holds the pieces they
share:

- :class:`Holdings`, how many of something each key holds now (a member's
  pending transactions or pulls in flight, an address's connections);
- :class:`Quota`, a token bucket per key (a member, an address): ``rate`` per
  minute with a burst of ``burst``; and
- :class:`Refusals`, which counts every refusal by limit name (the metric
  ``ehrnode_limited_total{limit=...}``) and logs ``limit.refused`` at most once
  per (limit, who) per minute, with how many were refused since the last line, so a
  flood costs a log line a minute, not a line per attempt.

Time is passed in (seconds, any monotonic clock), so both are tested without one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .logs import get_logger

#: Keys a quota or a refusal log remembers before it forgets the oldest (an address flood
#: cannot grow them without bound).
MAX_KEYS = 10_000


class Holdings:
    """How many of something each key holds now; a key that holds none is forgotten, so the
    table never grows past the keys holding something."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def of(self, key: str) -> int:
        return self._held.get(key, 0)

    def take(self, key: str) -> None:
        self._held[key] = self._held.get(key, 0) + 1

    def release(self, key: str) -> None:
        left = self._held.get(key, 0) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)


class Quota:
    """At most ``burst`` at once and ``per_minute`` a minute, per key."""

    def __init__(self, per_minute: float, burst: int) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("a quota needs a positive rate and a burst of at least 1")
        self.per_second = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)

    def take(self, key: str, now: float) -> bool:
        """Use one unit of ``key``'s quota if there is one left; False if not (nothing used)."""
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= MAX_KEYS:
            self._buckets.pop(next(iter(self._buckets)))
        self._buckets[key] = (tokens - 1.0, now)
        return True


class Refusals:
    """Counts refusals by limit and logs each (limit, who) at most once per ``interval``."""

    def __init__(self, node: str, *, interval: float = 60.0) -> None:
        self.counts: Counter[str] = Counter()
        self.interval = interval
        self.log = get_logger(node=node)
        self._since: dict[tuple[str, str], tuple[float, int]] = {}  # (limit, who) -> (last logged, refused since)

    def refuse(self, limit: str, who: str, now: float, **fields: Any) -> None:
        """Count one refusal of ``who`` by ``limit``; log it unless this pair was logged within
        the interval (the next line says how many were refused meanwhile)."""
        self.counts[limit] += 1
        key = (limit, who)
        logged, pending = self._since.get(key, (float("-inf"), 0))
        pending += 1
        if now - logged < self.interval:
            self._since[key] = (logged, pending)
            return
        if key not in self._since and len(self._since) >= MAX_KEYS:
            self._since.pop(next(iter(self._since)))
        self._since[key] = (now, 0)
        self.log.warning("limit.refused", limit=limit, who=who, refused=pending, **fields)

    def total(self, limit: str) -> int:
        return self.counts[limit]
