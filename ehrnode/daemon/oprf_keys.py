"""This institution's part in the OPRF key's rounds: dealing, checking, answering complaints, and
holding its share.

The rounds themselves are the chain's (:mod:`ehrnode.ledger.oprf_rounds`); this takes the steps
that fall to this member as the chain reaches them, each once, and works out its share of every
completed round it is in. Nothing is kept on disk: the dealing polynomial is derived from the
member's master key and the round, so a restarted node deals, and answers a complaint about its
dealing, with the same polynomial; its share is opened again from the chain with its sealing key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .. import codec, crypto
from ..empi import dkg, oprf
from ..errors import AdmissionError, CryptoError
from ..ledger.oprf_rounds import Round
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction
from ..records.keys import load_secret

_POLYNOMIAL_DOMAIN = b"ehrnode/oprf-dealing/v1"
#: How long a step this node submitted may stay uncommitted before it is submitted again.
RESUBMIT_AFTER = 30.0
#: A phase is closed this long after the window passed by this node's clock, so that the block's
#: time (the leader's clock) has passed it too.
CLOSE_MARGIN_MS = 5_000
#: How often the rounds are looked at without a commit waking this up.
POLL_INTERVAL = 5.0

Submit = Callable[..., Transaction]


class OprfKeyUpkeep:
    def __init__(self, name: str, chain_id: str, state: LedgerState,
                 sealing: Callable[[], list[crypto.SealingKey]],
                 master_key_path: Path, submit: Submit, log: Any) -> None:
        self.name, self._chain_id, self._state = name, chain_id, state
        self._sealing, self._master_path = sealing, master_key_path
        self._submit, self._log = submit, log
        self._wake = trio.Event()
        self._asked: dict[tuple[str, int, str], tuple[bytes, float]] = {}  # step -> (tx id, when)
        #: This member's share of the latest completed round it is in: (round, share).
        self.held: tuple[int, int] | None = None
        self._shares: dict[int, int] = {}  # round -> this member's share (rounds it completed in)
        self._failed: set[int] = set()
        self._cannot_deal: set[int] = set()

    def wake(self, _tx: Transaction | None = None) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self.step()
            with trio.move_on_after(POLL_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()

    def view(self) -> dict[str, Any] | None:
        view = self._state.oprf.view()
        if view is not None:
            view["held"] = self.held[0] if self.held else None
        return view

    # -- the steps ---------------------------------------------------------------------------------

    def step(self) -> None:
        """Take whatever step of the latest round is this member's and not taken yet."""
        rounds = self._state.oprf
        current = rounds.current()
        if self.held is not None and (current is None or current.number != self.held[0]) and (
                current is None or self.name not in current.names):
            self._log.warning("oprf.share_retired", round=self.held[0],
                              detail="this institution holds no share of the current round")
            self.held = None
        self._shares = {n: v for n, v in self._shares.items() if current is None or n >= current.number - 1}
        if current is not None and self.name in current.names and (self.held is None or self.held[0] != current.number):
            share = self.share_of(current)
            if share is not None:
                self.held = (current.number, share)
                self._log.info("oprf.share_held", round=current.number, threshold=current.threshold,
                               participants=current.names)
        r = rounds.latest()
        if r is None:
            return
        if r.status == "dealing" and self.name in r.dealers and self.name not in rounds.dealt(r.number):
            self._deal(r)
        elif r.status == "verifying":
            if self.name in r.names and self.name not in rounds.verdicts(r.number):
                self._verdict(r)
            for complaint in rounds.complaints(r.number):
                if complaint["dealer"] == self.name and complaint["status"] == "open":
                    self._reveal(r, complaint["complainer"])
        if (r.status in ("dealing", "verifying") and self.name in r.names
                and rounds.closable(r, int(time.time() * 1000) - CLOSE_MARGIN_MS)):
            # Someone has not taken part for a whole window: go on with those who did.
            self._log.warning("oprf.closing", round=r.number, phase=r.status,
                              waiting_for=(rounds.view() or {}).get("waiting_for"))
            self._once(("close", r.number, r.status), "keys.oprf_close", {"round": r.number})

    def _polynomial(self, r: Round) -> list[int] | None:
        """This member's dealing polynomial in a round: derived, so it is the same after a restart."""
        seed = hmac.digest(load_secret(self._master_path, "master key"),
                           _POLYNOMIAL_DOMAIN + codec.encode([self._chain_id, r.number]), hashlib.sha256)
        coefficients = [oprf.hash_to_scalar(seed, j.to_bytes(2, "big")) or 1 for j in range(r.threshold)]
        if r.mode == "reshare":
            previous = self._state.oprf.get(r.reshares or 0)
            secret = self.share_of(previous) if previous is not None else None
            if secret is None:
                return None
            coefficients[0] = secret
        return coefficients

    def _deal(self, r: Round) -> None:
        coefficients = self._polynomial(r)
        if coefficients is None:
            if r.number not in self._cannot_deal:
                self._cannot_deal.add(r.number)
                self._log.error("oprf.cannot_deal", round=r.number, reshares=r.reshares,
                                detail="this member does not hold its share of the round being reshared")
            return
        dealing = dkg.deal_polynomial(self._chain_id, r.number, self.name, coefficients,
                                      {n: (r.index(n), k) for n, k in r.participants})
        self._once(("deal", r.number, ""), "keys.oprf_deal", dealing.body(r.number))

    def _verdict(self, r: Round) -> None:
        complaints = [dealer for dealer, body in sorted(self._state.oprf.dealings(r.number).items())
                      if self._opened(r, dealer, body) is None]
        if complaints:
            self._log.error("oprf.bad_shares", round=r.number, dealers=complaints,
                            detail="shares dealt to this member do not match their commitments: complaining")
        self._once(("verdict", r.number, ""), "keys.oprf_verdict", {"round": r.number, "complaints": complaints})

    def _reveal(self, r: Round, complainer: str) -> None:
        coefficients = self._polynomial(r)
        if coefficients is None:
            return
        share = dkg.polynomial_at(coefficients, r.index(complainer))
        self._log.warning("oprf.revealing", round=r.number, complainer=complainer,
                          detail="the member says this node's share to it is wrong: it is published for all to check")
        self._once(("reveal", r.number, complainer), "keys.oprf_reveal",
                   {"round": r.number, "complainer": complainer, "share": oprf.scalar_bytes(share)})

    def _once(self, step: tuple[str, int, str], kind: str, body: dict[str, Any]) -> None:
        """Submit a step unless it was submitted and may still commit."""
        asked = self._asked.get(step)
        if asked is not None:
            # Done, or asked recently: an invalid step (a close this node's clock thought due
            # before the chain's did) is tried again after a pause, not at every block.
            if self._state.tx_status(asked[0]) == "ok" or time.monotonic() - asked[1] < RESUBMIT_AFTER:
                return
        try:
            tx = self._submit(kind, body)
        except AdmissionError as exc:
            self._log.warning("oprf.step_refused", step=step[0], round=step[1], reason=exc.reason, error=str(exc))
            return
        self._asked[step] = (tx.id, time.monotonic())
        self._log.info("oprf.step", step=step[0], round=step[1], tx=tx.id.hex()[:16])

    # -- shares ------------------------------------------------------------------------------------

    def _opened(self, r: Round, dealer: str, body: dict[str, Any]) -> int | None:
        """The share ``dealer`` dealt this member in ``r``, if it opens and matches the commitments."""
        try:
            sealed = body["shares"][self.name]
            points = [oprf.decode_point(c) for c in body["commitments"]]
        except (CryptoError, KeyError):
            return None
        # The member's current sealing key, then its retired ones: a round before a key
        # replacement sealed its shares to the key of the time.
        for sealing in self._sealing():
            try:
                share = dkg.open_share(sealing, self._chain_id, r.number, dealer, self.name, sealed)
            except CryptoError:
                continue
            return share if dkg.check_share(points, r.index(self.name), share) else None
        return None

    def share_of(self, r: Round) -> int | None:
        """This member's share of a completed round (None: it cannot be worked out, which is logged)."""
        if r.number in self._shares:
            return self._shares[r.number]
        if r.status != "complete" or self.name not in r.names or r.number in self._failed:
            return None
        rounds = self._state.oprf
        dealings = rounds.dealings(r.number)
        revealed = {c["dealer"]: int.from_bytes(c["share"], "big") for c in rounds.complaints(r.number)
                    if c["complainer"] == self.name and c["status"] == "answered"}
        weights = rounds.weights(r)
        dealt: dict[int, int] = {}
        for i, dealer in enumerate(r.qualified):
            share = revealed.get(dealer)
            if share is None:
                share = self._opened(r, dealer, dealings[dealer])
            if share is None:
                self._failed.add(r.number)
                self._log.error("oprf.share_unavailable", round=r.number, dealer=dealer,
                                detail="a share dealt to this member does not open with its sealing key")
                return None
            dealt[i] = share
        combined = dkg.combined_share(dealt, {i: weights[d] for i, d in enumerate(r.qualified)})
        if not combined or oprf.encode_point(oprf.base_multiply(combined)) != r.public_shares.get(self.name):
            self._failed.add(r.number)
            self._log.error("oprf.share_mismatch", round=r.number,
                            detail="this member's share does not match its public share on the chain")
            return None
        self._shares[r.number] = combined
        return combined
