"""Who is in the consortium during one consensus epoch.

Genesis lists the first members. After that, membership changes only by a
governance proposal the current validators adopt (:mod:`ehrnode.ledger.governance`):
the consensus epoch ends at the block that adopts it and the next one starts
with the changed list. Every node derives the same list, in the same order, from
the same committed blocks: members keep their place, a removed member leaves a
gap that closes up, a new member is appended. A member's index in that order
is its validator index for the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property

from .config import Member
from .errors import ConfigError


@dataclass(frozen=True)
class Membership:
    """The members of consensus epoch ``epoch``, which starts at height ``starts``."""

    epoch: int
    starts: int
    members: tuple[Member, ...]

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @cached_property
    def _by_name(self) -> dict[str, Member]:
        return {m.name: m for m in self.members}

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The validators' signing keys, in index order."""
        return tuple(m.signing_key for m in self.members)

    @property
    def signing_keys(self) -> dict[str, bytes]:
        return {m.name: m.signing_key for m in self.members}

    @property
    def sealing_keys(self) -> dict[str, bytes]:
        return {m.name: m.sealing_key for m in self.members}

    @property
    def roles(self) -> dict[str, str]:
        return {m.name: m.role for m in self.members}

    @property
    def quorum(self) -> int:
        """2f+1 of n = 3f+1 (or more): the signatures, or votes, that decide."""
        return len(self.members) - (len(self.members) - 1) // 3

    def get(self, name: str) -> Member | None:
        return self._by_name.get(name)

    def member(self, name: str) -> Member:
        found = self._by_name.get(name)
        if found is None:
            raise ConfigError(f"{name!r} is not a member of the consortium (consensus epoch {self.epoch})")
        return found

    def index(self, name: str) -> int:
        return self.members.index(self.member(name))

    def index_of(self, name: str) -> int | None:
        """``name``'s validator index, or None if it is not a member."""
        found = self._by_name.get(name)
        return None if found is None else self.members.index(found)

    def changed(self, change: str, member: Member, starts: int) -> Membership:
        """The next epoch's membership after ``change`` (add, remove or rotate-key) of ``member``."""
        if change == "add":
            members = (*self.members, member)
        elif change == "remove":
            members = tuple(m for m in self.members if m.name != member.name)
        else:
            members = tuple(replace(m, signing_key=member.signing_key, sealing_key=member.sealing_key,
                                    address=member.address)
                            if m.name == member.name else m for m in self.members)
        return Membership(self.epoch + 1, starts, members)
