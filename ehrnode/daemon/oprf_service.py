"""Evaluating values under the OPRF key: asking the other holders, and answering them.

As a **requester**, an institution blinds the values, commits an ``empi.oprf_batch``
(round, count, digest of the points: :mod:`ehrnode.ledger.oprf_usage`), sends the points
to the other holders of the current round, checks each answer's proof against the
answering member's public share, and combines the first ``t - 1`` good answers with its
own share's evaluation. Outputs are cached: q-grams and blocking codes recur across
patients, and every value evaluated once costs nothing again; a value another request is
evaluating now is waited for, not asked again.

As an **evaluator**, it answers a batch only if the batch is committed, was committed by
the peer asking, carries exactly the points sent, is for the round this member holds a
share of, and keeps the requester within this member's daily quota
(``[limits] oprf_daily``). Everything else is refused, counted and logged; the requester
sees why. The arithmetic runs in a worker thread, one batch at a time, so the event loop
stays free.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..empi import oprf
from ..empi.oprf_messages import EvaluationAnswer, EvaluationRequest, points_digest, proof_context
from ..errors import AdmissionError, CodecError, CryptoError, KeyUnavailable
from ..ledger.oprf_rounds import Round
from ..ledger.state import LedgerState
from ..ledger.transactions import MAX_OPRF_BATCH, Transaction
from .oprf_keys import OprfKeyUpkeep

#: How long a request waits for the key to exist and enough of its holders to be reachable.
READY_TIMEOUT = 30.0
#: How long a requester waits for the holders' answers to one batch (its commit included).
ANSWER_TIMEOUT = 20.0
#: How long a requester waits for a holder it asked before asking another as well.
HEDGE_AFTER = 5.0
#: How long a batch may take to commit before the request is given up.
COMMIT_TIMEOUT = 15.0
#: How long an evaluator waits for a batch it is asked about to commit here (requesters ask as
#: soon as they submit the batch).
BATCH_LAG = 10.0
#: Cached outputs (value -> output), least recently used dropped first.
CACHE_ENTRIES = 1 << 18
#: A batch is answered only this many blocks after it committed: requesters ask at once.
FRESH_BLOCKS = 1000
#: How many times one batch is answered (a lost answer may be asked again; no more).
ANSWERS_PER_BATCH = 3


@dataclass
class _Evaluation:
    """One batch of values a request is evaluating: done once it has its outputs or has failed."""

    values: list[bytes]
    key: bytes | None  # the group key it was asked under
    outputs: dict[bytes, bytes] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Pending:
    holders: dict[str, bytes]          # who may be asked -> their public share
    channel: trio.MemorySendChannel[tuple[str, EvaluationAnswer]]
    refusals: dict[str, str] = field(default_factory=dict)
    received: set[str] = field(default_factory=set)   # one answer per holder is taken


class OprfService:
    def __init__(self, name: str, chain_id: str, state: LedgerState, keys: OprfKeyUpkeep, *,
                 submit: Callable[..., Transaction], wait_committed: Callable[[bytes, float], Any],
                 send_request: Callable[[str, bytes], bool], send_answer: Callable[[str, bytes], bool],
                 connected: Callable[[], list[str]],
                 daily_quota: int, log: Any, count: Callable[[str], None] = lambda outcome: None) -> None:
        self.name, self._chain_id, self._state, self._keys = name, chain_id, state, keys
        self._submit, self._wait_committed, self._connected = submit, wait_committed, connected
        self._send_request, self._send_answer = send_request, send_answer
        self.daily_quota = daily_quota
        self._log, self._count = log, count
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        #: Values being evaluated now, each with the batch that asks for it.
        self._evaluating: dict[bytes, _Evaluation] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._answered: OrderedDict[bytes, int] = OrderedDict()
        self._cpu = trio.CapacityLimiter(1)         # this member's own requests
        self._serving_cpu = trio.CapacityLimiter(1)  # answering others: one member's load cannot stall ours
        #: The group key the cached outputs are under; a new key (a fresh round) empties the cache.
        self._cache_key: bytes | None = None
        #: Called when the key changes, so caches built on outputs (the encoder's) are emptied too.
        self.key_listeners: list[Callable[[], None]] = []

    # -- requesting ----------------------------------------------------------------------------------

    async def evaluate(self, values: Sequence[bytes], actor: bytes = b"") -> dict[bytes, bytes]:
        """The OPRF outputs of ``values`` (raises KeyUnavailable when the holders cannot be reached
        or there is no key yet, AdmissionError when a batch is refused)."""
        current = self._state.oprf.current()
        if current is not None and current.public_key != self._cache_key:
            if self._cache_key is not None:
                self._log.warning("oprf.key_changed", round=current.number,
                                  detail="a fresh OPRF key: cached evaluations are dropped")
            self._cache.clear()
            for listener in self.key_listeners:
                listener()
            self._cache_key = current.public_key
        key = self._cache_key
        out: dict[bytes, bytes] = {}
        missing: list[bytes] = []
        others: dict[bytes, _Evaluation] = {}  # values another request is evaluating now
        for value in dict.fromkeys(values):
            cached = self._cache.get(value)
            if cached is not None:
                self._cache.move_to_end(value)
                out[value] = cached
            elif value in self._evaluating:
                others[value] = self._evaluating[value]
            else:
                missing.append(value)
        chunks = [_Evaluation(missing[i:i + MAX_OPRF_BATCH], key) for i in range(0, len(missing), MAX_OPRF_BATCH)]
        for chunk in chunks:
            self._evaluating.update(dict.fromkeys(chunk.values, chunk))
        try:
            for chunk in chunks:
                try:
                    outputs = await self._batch(chunk.values, actor)
                    chunk.outputs = dict(zip(chunk.values, outputs, strict=True))
                finally:
                    self._finish(chunk)
                out.update(chunk.outputs)
                if self._cache_key == key:      # not if the key changed while this was asked
                    self._cache.update(chunk.outputs)
        finally:
            for chunk in chunks:  # those not reached (an earlier one failed, or this was cancelled)
                self._finish(chunk)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        if others:
            # Asked for already (say, while the input was still arriving): those answers are
            # waited for, not asked again; what they did not bring (their request failed, or the
            # key changed meanwhile) is asked now.
            again = []
            for value, evaluation in others.items():
                await evaluation.done.wait()
                if value in evaluation.outputs and evaluation.key == self._cache_key == key:
                    out[value] = evaluation.outputs[value]
                else:
                    again.append(value)
            if again:
                out.update(await self.evaluate(again, actor))
        return out

    def _finish(self, chunk: _Evaluation) -> None:
        """A batch is over (answered, failed, or never asked): whoever waits for one of its values
        goes on, and takes its output or asks again."""
        if chunk.done.is_set():
            return
        for value in chunk.values:
            if self._evaluating.get(value) is chunk:
                del self._evaluating[value]
        chunk.done.set()

    async def _holders(self) -> tuple[Round, int | None, dict[str, bytes], int]:
        """The current round, this member's share of it, the reachable other holders (their public
        shares) and how many of them must answer; waits up to ``READY_TIMEOUT`` for a key (at a
        consortium's first start it is being generated) and for enough holders to be connected."""
        deadline = trio.current_time() + READY_TIMEOUT
        while True:
            r = self._state.oprf.current()
            if r is not None:
                mine = self._keys.held[1] if self._keys.held and self._keys.held[0] == r.number else None
                needed = r.threshold - (1 if mine is not None else 0)
                connected = set(self._connected())
                holders = {n: r.public_shares[n] for n in r.names if n != self.name and n in connected}
                if len(holders) >= needed:
                    return r, mine, holders, needed
            if trio.current_time() >= deadline:
                break
            await trio.sleep(0.2)
        if r is None:
            raise KeyUnavailable("the EMPI's OPRF key is not generated yet: every institution must be running to "
                                 "generate it (see `ehrnode status`: oprf.waiting_for)", reason="oprf_not_ready")
        raise KeyUnavailable(f"{needed} other holder(s) of the EMPI's OPRF key must be reachable; "
                             f"{len(holders)} are", reason="oprf_unavailable")

    async def _batch(self, values: list[bytes], actor: bytes) -> list[bytes]:
        r, mine, holders, needed = await self._holders()
        blinded = await trio.to_thread.run_sync(lambda: [oprf.blind(v) for v in values], limiter=self._cpu)
        points = [oprf.encode_point(b.point) for b in blinded]
        tx = self._submit("empi.oprf_batch", {"round": r.number, "size": len(points),
                                              "digest": points_digest(points)}, actor)
        answers: dict[int, list[oprf.PublicKey]] = {}
        if needed:
            # Asked at once: each holder waits for the batch to commit on its side before it answers.
            try:
                answers = await self._ask(tx.id, r.number, points, holders, needed, [b.point for b in blinded],
                                          {n: r.index(n) for n in holders})
            except KeyUnavailable:
                status = self._state.tx_status(tx.id)
                if status is not None and status != "ok":
                    raise AdmissionError(f"the OPRF batch was refused: {status}", reason="oprf_batch_refused") from None
                raise
        elif await self._wait_committed(tx.id, COMMIT_TIMEOUT) is None:
            raise KeyUnavailable("an OPRF batch did not commit in time", reason="commit_timeout")
        own = (r.index(self.name), mine) if mine is not None else None
        return await trio.to_thread.run_sync(lambda: oprf.combine(blinded, answers, own), limiter=self._cpu)

    async def _ask(self, batch: bytes, round_: int, points: list[bytes], holders: dict[str, bytes], needed: int,
                   decoded: list[oprf.PublicKey], index: dict[str, int]) -> dict[int, list[oprf.PublicKey]]:
        """Verified evaluations from ``needed`` holders: asks that many (which ones varies with the
        batch, so the work spreads), and another whenever one refuses, fails its proof or has not
        answered within ``HEDGE_AFTER``."""
        send, receive = trio.open_memory_channel[tuple[str, EvaluationAnswer]](len(holders))
        self._pending[batch] = pending = _Pending(holders, send)
        request = EvaluationRequest(batch, tuple(points)).encode()
        queue = sorted(holders, key=lambda n: hashlib.sha256(batch + n.encode()).digest())
        asked: list[str] = []
        answered: set[str] = set()
        good: dict[int, list[oprf.PublicKey]] = {}

        def ask(count: int) -> None:
            while count > 0 and queue:
                name = queue.pop(0)
                if self._send_request(name, request):
                    asked.append(name)
                    count -= 1

        try:
            ask(needed)
            with trio.move_on_after(ANSWER_TIMEOUT):
                while len(good) < needed:
                    outstanding = len(asked) - len(answered)
                    if outstanding < needed - len(good):
                        ask(needed - len(good) - outstanding)
                        outstanding = len(asked) - len(answered)
                    if outstanding == 0:
                        break                       # everyone asked has answered, and no one is left
                    with trio.move_on_after(HEDGE_AFTER) as hedge:
                        peer, answer = await receive.receive()
                    if hedge.cancelled_caught:
                        ask(1)                      # slow: ask one more besides
                        continue
                    if peer not in asked:
                        continue                    # not asked: its answer does not count
                    answered.add(peer)
                    if answer.status != "ok":
                        pending.refusals[peer] = answer.reason
                    elif answer.round != round_:
                        pending.refusals[peer] = f"answered for round {answer.round}"
                    else:
                        checked = await trio.to_thread.run_sync(
                            self._check, peer, holders[peer], decoded, answer, batch, limiter=self._cpu)
                        if checked is None:
                            pending.refusals[peer] = "proof_failed"
                            self._log.error("oprf.bad_answer", peer=peer, batch=batch.hex()[:16],
                                            detail="an evaluation did not match the member's public share")
                        else:
                            good[index[peer]] = checked
        finally:
            del self._pending[batch]
        if len(good) < needed:
            raise KeyUnavailable(
                f"{len(good)} of the {needed} evaluation(s) needed came back "
                f"(refused: {pending.refusals or 'none'}; asked: {sorted(asked)})", reason="oprf_unavailable")
        return good

    def _check(self, peer: str, public: bytes, points: list[oprf.PublicKey], answer: EvaluationAnswer,
               batch: bytes) -> list[oprf.PublicKey] | None:
        try:
            evaluated = [oprf.decode_point(p) for p in answer.evaluated]
            ok = oprf.verify(oprf.decode_point(public), points, evaluated, answer.proof,
                             proof_context(self._chain_id, batch, peer))
        except CryptoError:
            return None
        return evaluated if ok else None

    def on_answer(self, peer: str, data: bytes) -> None:
        try:
            answer = EvaluationAnswer.decode(data)
        except CodecError as exc:
            self._log.warning("oprf.bad_message", peer=peer, error=str(exc))
            return
        pending = self._pending.get(answer.batch)
        if pending is None or peer not in pending.holders or peer in pending.received:
            return                          # late, not asked, or answered already
        pending.received.add(peer)
        try:
            pending.channel.send_nowait((peer, answer))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    # -- answering -----------------------------------------------------------------------------------

    async def serve(self, peer: str, data: bytes) -> None:
        """Answer one request from ``peer`` (refusals are answered too, with the reason)."""
        try:
            request = EvaluationRequest.decode(data)
        except CodecError as exc:
            self._log.warning("oprf.bad_message", peer=peer, error=str(exc))
            self._count("malformed")
            return
        reason, answer = await self._evaluate(peer, request)
        if answer is None:
            self._count("refused")
            self._log.warning("oprf.refused", peer=peer, batch=request.batch.hex()[:16], reason=reason,
                              size=len(request.points))
            answer = EvaluationAnswer(request.batch, "refused", reason)
        else:
            self._count("answered")
        self._send_answer(peer, answer.encode())

    async def _evaluate(self, peer: str, request: EvaluationRequest) -> tuple[str, EvaluationAnswer | None]:
        batch = self._state.oprf_usage.batch(request.batch)
        if batch is None:
            await self._wait_committed(request.batch, BATCH_LAG)
            batch = self._state.oprf_usage.batch(request.batch)
        if batch is None:
            return "batch_not_committed", None
        if batch["requester"] != peer:
            return "not_the_requester", None
        if batch["size"] != len(request.points) or batch["digest"] != points_digest(request.points):
            return "points_differ", None
        held = self._keys.held
        if held is None or held[0] != batch["round"]:
            return f"no_share_of_round_{batch['round']}", None
        if batch["cumulative"] > self.daily_quota:
            return f"over_quota ({batch['cumulative']} of {self.daily_quota} today)", None
        if self._state.applied_height - batch["height"] > FRESH_BLOCKS:
            return "batch_too_old", None
        answered = self._answered.get(request.batch, 0)
        if answered >= ANSWERS_PER_BATCH:
            return "answered_already", None
        self._answered[request.batch] = answered + 1
        while len(self._answered) > 65536:
            self._answered.popitem(last=False)
        share = held[1]
        context = proof_context(self._chain_id, request.batch, self.name)

        def work() -> EvaluationAnswer | None:
            try:
                points = [oprf.decode_point(p) for p in request.points]
                evaluated, proof = oprf.evaluate(share, points, context)
            except CryptoError:
                return None
            return EvaluationAnswer(request.batch, "ok", "", held[0], tuple(oprf.encode_point(e) for e in evaluated),
                                    proof)

        started = time.monotonic()
        answer = await trio.to_thread.run_sync(work, limiter=self._serving_cpu)
        if answer is None:
            return "not_points", None
        self._log.debug("oprf.answered", peer=peer, batch=request.batch.hex()[:16], size=len(request.points),
                        seconds=round(time.monotonic() - started, 4))
        return "", answer
