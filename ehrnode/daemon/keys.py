"""Key upkeep: rotating the epoch key, asking for a key this member lacks, answering such requests,
and taking up the replacement keys the consortium adopted for this member.

Epoch keys (see docs/security.md) are sealed to every member in a ``keys.epoch`` grant. The
member whose turn it is opens a new epoch once the current key is ``rotate_days`` old, or at once
after a membership change (a departed member still holds the current key; a new one was not sealed
it). A member that finds it cannot open an epoch's key asks (``keys.request``) and every member that
holds it seals it again (``keys.reseal``).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .. import crypto
from ..config import NodeConfig
from ..epochs import EpochGrant, EpochKeys
from ..errors import AdmissionError, ConfigError, CryptoError
from ..ledger.chain import Chain
from ..ledger.transactions import Transaction

#: After a membership change, how long the member whose turn it is has to rotate the epoch key
#: before any member does.
MEMBERSHIP_ROTATION_GRACE = 20.0

#: ``submit(kind, body, actor)``: sign as this member, admit and gossip (raises AdmissionError).
Submit = Callable[..., Transaction]


class KeyUpkeep:
    def __init__(self, name: str, config: NodeConfig, chain_id: str, chain: Chain, epoch_keys: EpochKeys,
                 submit: Submit, log: Any) -> None:
        self.name, self._config, self._chain_id = name, config, chain_id
        self._chain, self._state, self._keys = chain, chain.state, epoch_keys
        self._submit, self._log = submit, log
        self._wake = trio.Event()
        self._requested: set[int] = set()  # epochs whose key this member asked to be sealed again
        self._membership_changed = time.time()

    def wake(self) -> None:
        """A stall: upkeep is due at once."""
        self._wake.set()

    def membership_changed(self) -> None:
        self._membership_changed = time.time()
        self._wake.set()

    def rotate(self, actor: bytes = b"") -> Transaction:
        """Open the next epoch: a fresh key sealed to every current member (raises AdmissionError)."""
        grant = EpochGrant.create(self._chain_id, self._state.latest_epoch + 1, self._state.membership.sealing_keys)
        tx = self._submit("keys.epoch", grant.body(), actor)
        self._log.info("keys.rotating", epoch=grant.epoch, tx=tx.id.hex()[:16])
        return tx

    def view(self) -> dict[str, Any]:
        """The epochs of the chain and which of their keys this member holds."""
        return {
            "current": self._state.current_epoch, "rotate_days": self._config.rotate_days,
            "epochs": [{**e, "tx_id": e["tx_id"].hex() if e["tx_id"] else None, "held": e["epoch"] in self._keys}
                       for e in self._state.epochs()],
            "unreadable": {str(epoch): why for epoch, why in self._keys.unreadable.items()},
        }

    async def run(self) -> None:
        """Rotate the epoch key once it is ``rotate_days`` old, or at once when the membership
        changed since it was sealed, if it is this member's turn; ask for a key the ledger stalled on.

        The turn goes round the members by epoch number; if the member whose turn it is
        has not rotated half an interval later (after a membership change:
        ``MEMBERSHIP_ROTATION_GRACE`` later), any member does. The first grant committed
        opens the epoch; a second one for the same epoch is refused as stale.
        """
        interval = self._config.rotate_days * 86400
        asked: tuple[int, bytes] | None = None  # (epoch rotated out of, its grant's transaction)
        state = self._state
        while True:
            with trio.move_on_after(min(60.0, interval / 10)):
                await self._wake.wait()
            self._wake = trio.Event()
            membership, epochs, stalled = state.membership, state.epochs(), self._chain.stalled_at
            if stalled is not None and self.name in membership:
                self._request(state.epoch_at(stalled))
            if not epochs or stalled is not None or self.name not in membership:
                continue
            latest = epochs[-1]
            names = sorted(membership.names)
            turn = names[latest["epoch"] % len(names)] == self.name
            if state.grant_recipients(latest["epoch"]) != set(names):
                # Sealed to members that are no longer the membership: a departed member still
                # holds this key, a new one is not sealed the next.
                due = turn or time.time() - self._membership_changed >= MEMBERSHIP_ROTATION_GRACE
            else:
                age = time.time() - latest["time"] / 1000
                due = (turn and age >= interval) or age >= interval * 1.5
            if asked is not None and asked[0] == latest["epoch"] and not (
                    state.tx_status(asked[1]) or "").startswith("invalid"):
                continue  # asked already, and not refused
            if due:
                try:
                    asked = (latest["epoch"], self.rotate().id)
                except AdmissionError as exc:
                    self._log.warning("keys.rotation_refused", reason=exc.reason, error=str(exc))

    def _request(self, epoch: int) -> None:
        """Ask the members to seal ``epoch``'s key to this member again (once per start)."""
        if epoch in self._requested or epoch in self._keys:
            return
        try:
            tx = self._submit("keys.request", {"epoch": epoch})
        except AdmissionError as exc:
            self._log.warning("keys.request_refused", epoch=epoch, reason=exc.reason, error=str(exc))
            return
        self._requested.add(epoch)
        self._log.warning("keys.requested", epoch=epoch, tx=tx.id.hex()[:16])

    def answer(self, tx: Transaction) -> None:
        """Another member cannot open its copy of an epoch's key (a committed ``keys.request``):
        seal this member's to it.

        Every member that holds the key answers; the requester takes the first copy that opens
        to the key the epoch's check value commits to, so a wrong copy from one member costs
        nothing."""
        member = self._state.membership.get(tx.submitter)
        if tx.submitter == self.name or member is None:
            return
        sealed = self._keys.reseal(tx.body["epoch"], member.sealing_key)
        if sealed is None:
            return
        try:
            self._submit("keys.reseal", {"epoch": tx.body["epoch"], "member": member.name, "sealed": sealed})
        except AdmissionError as exc:
            self._log.warning("keys.reseal_refused", member=member.name, reason=exc.reason, error=str(exc))
            return
        self._log.info("keys.resealed", epoch=tx.body["epoch"], member=member.name)


def next_keys(config: NodeConfig) -> tuple[crypto.Identity, crypto.SealingKey] | None:
    """The replacement keys made by ``consortium new-keys``, if there are any."""
    signing, sealing = config.next_key_paths
    if not signing.exists() or not sealing.exists():
        return None
    try:
        return crypto.Identity.load(signing), crypto.SealingKey.load(sealing)
    except CryptoError as exc:
        raise ConfigError(str(exc)) from exc


def adopt_next_keys(config: NodeConfig, keys: crypto.MemberKeys,
                    following: tuple[crypto.Identity, crypto.SealingKey] | None,
                    listed: tuple[bytes, bytes] | None, log: Any) -> bool:
    """Make ``following`` (from :func:`next_keys`) the member's keys if the consortium lists them
    for it (``listed``: the signing and sealing keys the membership names); the key files are
    swapped, the old ones kept renamed. Whether they were adopted."""
    if following is None or listed != (following[0].public_key, following[1].public_key):
        return False
    keys.replace(*following)
    log.warning("keys.replaced", retired=[str(p) for p in _take_next_keys(config)],
                detail="the consortium adopted this member's new keys: they are its keys now")
    return True


def retired_sealing_keys(config: NodeConfig) -> list[crypto.SealingKey]:
    """The member's earlier sealing keys, kept renamed beside its key when replaced (newest first;
    one that does not load is left out)."""
    path = config.sealing_key_path
    keys = []
    for retired in sorted(path.parent.glob(f"{path.stem}.retired-*{path.suffix}"), reverse=True):
        try:
            keys.append(crypto.SealingKey.load(retired))
        except (CryptoError, ConfigError, OSError):
            continue
    return keys


def _take_next_keys(config: NodeConfig) -> list[Path]:
    """Make the replacement keys the member's keys; the old ones are kept, renamed, and returned."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = []
    for current, following in zip((config.signing_key_path, config.sealing_key_path), config.next_key_paths,
                                  strict=True):
        old = current.with_name(f"{current.stem}.retired-{stamp}{current.suffix}")
        try:
            os.replace(current, old)
            os.replace(following, current)
        except OSError as exc:
            raise ConfigError(f"cannot put the new key {following} in place of {current}: {exc.strerror}") from exc
        retired.append(old)
    return retired
