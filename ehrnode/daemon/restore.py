"""After a restore from a backup: sign nothing until the other validators say how far the chain got.

A validator restored from a backup may have voted, before the backup's copy was lost, in rounds
its restored safety data does not remember. It asks the others for their highest certificates
(a nonce-bound ``RoundQuery``); once 2f+1 of them have answered it raises its safety floor above
every round they report (see consensus/survey.py), hands the certificates to the core, and signs
again. Every node answers such queries with the certificates it holds.
"""

from __future__ import annotations

from typing import Any

import trio

from ..consensus.survey import RoundSurvey, encode_answer
from ..errors import InvalidMessage
from ..net.peers import Peer, PeerNetwork
from ..net.protocol import RoundAnswerFrame, RoundQueryFrame, encode_frame
from .driver import Driver

#: Seconds between asking again the validators that have not answered.
SURVEY_RETRY = 2.0


class Restore:
    def __init__(self, driver: Driver, network: PeerNetwork, log: Any) -> None:
        self._driver, self._network, self._log = driver, network, log
        core = driver.core
        #: Set while this validator waits for the others' certificates.
        self.survey: RoundSurvey | None = None
        if core.safety.data.restored and core.index is not None:
            self.survey = RoundSurvey.fresh(core.vset, core.index)
            log.warning("restore.waiting", needed=self.survey.needed,
                        detail="restored from a backup: signing resumes once 2f+1 other validators have "
                               "reported their highest certificates")

    def connected(self, name: str) -> None:
        if self.survey is not None:
            self._network.send(name, encode_frame(RoundQueryFrame(self.survey.nonce)))

    def query(self, peer: Peer, nonce: bytes) -> None:
        """Another validator asks for this node's highest certificates."""
        # Only certificates this node really holds: not before its core has loaded them, and
        # not while it is itself restored (its stores may be old).
        if self._driver.started and self.survey is None:
            core = self._driver.core
            self._network.send(peer.name, encode_frame(RoundAnswerFrame(
                encode_answer(nonce, core.high_qc, core.high_tc))))

    def answer(self, peer: Peer, data: bytes) -> None:
        survey = self.survey
        if survey is None:
            return  # not restoring (a late answer)
        membership = self._driver.membership
        sender = membership.index_of(peer.name)
        if sender is None:
            return
        try:
            survey.add(sender, data)
        except InvalidMessage as exc:
            self._log.warning("restore.bad_answer", peer=peer.name, reason=exc.reason, error=str(exc))
            return
        result = survey.result()
        if result is None:
            return
        floor = self._driver.core.safety.lift_restore(*result)
        self.survey = None
        self._log.warning("restore.resumed", floor=floor,
                          answered=[membership.members[i].name for i in sorted(survey.answers)])
        self._driver.learn_certificates(*result)

    async def run(self) -> None:
        """While restored, ask again every few seconds the validators that have not answered."""
        while self.survey is not None:
            await trio.sleep(SURVEY_RETRY)
            survey = self.survey
            if survey is None:
                return
            for name in self._network.connected():
                if self._driver.membership.index_of(name) not in survey.answers:
                    self._network.send(name, encode_frame(RoundQueryFrame(survey.nonce)))
