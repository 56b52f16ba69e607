"""The records side of a running node: recording, reading and checking, off the event loop.

The vault and the recorder are blocking (SQLite, encryption, FHIR validation),
so every call runs in a worker thread, one at a time under a lock, while the
node's event loop keeps voting. New anchors are handed to the node's mempool
through ``submit``; one the mempool cannot take now (full) stays in the vault's
outbox, which :meth:`RecordsService.run_outbox` offers again until the chain
has it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from .. import crypto
from ..config import NodeConfig
from ..empi.normalize import Demographics
from ..errors import AdmissionError, ConfigError, EhrnodeError, IntegrityError, StoreError
from ..ledger.empi_registry import scoped_enrolment
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction, anchors_of
from ..logs import get_logger
from . import deid as deid_module
from . import fhir
from .deid import Deidentifier, load_profile
from .keys import RecordKeys
from .recorder import Outcome, Recorder
from .vault import Vault
from .workers import Checked, Preparer, default_workers

OUTBOX_INTERVAL = 2.0


@dataclass(frozen=True)
class Hooks:
    """What the service needs from the node."""

    submit: Callable[[Transaction], None]  # admit and gossip; raises AdmissionError
    pending: Callable[[bytes], bool]  # in the mempool
    state: LedgerState
    #: OPRF outputs of values (:class:`~ehrnode.daemon.oprf_service.OprfService`), as user ``actor``.
    evaluate: Callable[[Sequence[bytes], bytes], Awaitable[dict[bytes, bytes]]]


#: Staged parts validated ahead at once (the workers take their chunks in turn).
CHECKS_AT_ONCE = 4


class RecordsService:
    def __init__(self, config: NodeConfig, *, chain_id: str, member: crypto.MemberKeys, hooks: Hooks) -> None:
        if config.master_key_path is None or config.consortium_key_path is None:
            raise ConfigError(f"{config.path}: recording needs [keys] master and consortium")
        self.name = config.name
        self.member = member
        self.hooks = hooks
        self.log = get_logger(node=config.name)
        keys = RecordKeys.load(config.master_key_path, config.consortium_key_path)
        self.profile = load_profile(config.deid_profile_path)
        self.vault = Vault(Path(config.data_dir) / "vault.sqlite3", keys, member)
        deid = Deidentifier(self.profile, keys.deid)
        workers = default_workers() if config.record_workers is None else config.record_workers
        self.preparer = Preparer(deid, config.deid_profile_path, keys.deid, workers=workers)
        self.recorder = Recorder(
            vault=self.vault, keys=keys, deidentifier=deid, institution=config.name, chain_id=chain_id,
            member=member, preparer=self.preparer, rules=hooks.state.rules,
        )
        self._lock = trio.Lock()
        # Validation ahead of staged input: a few parts at a time, in threads of their own.
        self._check_turns = trio.CapacityLimiter(CHECKS_AT_ONCE)
        self._check_threads = trio.CapacityLimiter(CHECKS_AT_ONCE)

    def close(self) -> None:
        self.preparer.close()
        self.vault.close()

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with self._lock:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    # --- recording ----------------------------------------------------------------------

    def checks_ahead(self, count: int) -> bool:
        """Whether :meth:`check` of ``count`` items would run in the worker processes."""
        return self.preparer.pooled(count)

    async def check(self, items: Sequence[fhir.Item], started: Callable[[], None] = lambda: None) -> list[Checked]:
        """Validate ``items`` ahead of recording them (:meth:`record`'s ``checked``): an input that
        comes in several messages is validated part by part while the rest arrives. At most
        ``CHECKS_AT_ONCE`` parts at a time over all connections (each spread over the workers), in
        threads of their own, so parts waiting never hold up the threads recording and reading
        the vault use; ``started`` is called when this part's turn comes."""
        async with self._check_turns:
            started()
            return await trio.to_thread.run_sync(self.recorder.check, items, limiter=self._check_threads)

    async def evaluate_ahead(self, items: Sequence[fhir.Item], actor: bytes) -> None:
        """Ask for the OPRF outputs the Patients among ``items`` need, ahead of recording them
        (staged input: the evaluation runs while the rest arrives, and :meth:`record` then finds
        them cached, or waits for them). A failure is logged; :meth:`record` asks again and says
        why if it fails there too."""
        started = time.monotonic()
        try:
            inputs = await trio.to_thread.run_sync(self.recorder.oprf_inputs, items)
            if inputs:
                await self.hooks.evaluate(inputs, actor)
                self.log.info("records.evaluated_ahead", patients=len(items), inputs=len(inputs),
                              seconds=round(time.monotonic() - started, 3))
        except EhrnodeError as exc:
            self.log.warning("records.evaluate_ahead_failed", patients=len(items), reason=exc.reason, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - ahead of time only: the connection must not end for it
            self.log.error("records.evaluate_ahead_failed", patients=len(items), error=repr(exc))

    async def record(self, items: Sequence[fhir.Item], *, skip_invalid: bool, actor: bytes = b"",
                     ahead: Callable[[], Awaitable[Sequence[Checked]]] | None = None) -> Outcome:
        """Record ``items`` (all or nothing) as user ``actor``; raises FhirError for invalid input.

        ``ahead``: waits for what :meth:`check` found of the first items, when parts of the input
        were validated ahead; the OPRF evaluation the input's Patients need is under way
        meanwhile (a round trip to the other holders, and CPU work that the wait leaves room for)."""
        started = time.monotonic()
        anchored = self.hooks.state.highest_position(self.name)
        head = (await self._blocking(self.vault.head))[0]
        if anchored > head:
            # New entries would reuse positions the chain already holds: their anchors would all
            # be refused. This vault lost entries (restored from an old copy?).
            self.log.error("vault.behind_chain", anchored=anchored, vault_head=head)
            raise IntegrityError(f"the vault ends at position {head} but the chain holds anchors up to {anchored}: "
                                 "restore the latest vault backup before recording", reason="vault_behind")
        # Reading every Patient's demographics is CPU work a large input must not do on the loop.
        inputs = await trio.to_thread.run_sync(self.recorder.oprf_inputs, items)
        outcome, checked = await self._prepare_and_write(items, skip_invalid, inputs, actor, ahead)
        if any(r.status == "already_recorded" for r in outcome.records):
            pending = {anchor["record"].hex(): tx_id.hex() for tx_id, data in await self._blocking(self.vault.outbox)
                       for anchor in anchors_of(Transaction.decode(data))}
            for i, r in enumerate(outcome.records):
                if r.status == "already_recorded":
                    anchors = self.hooks.state.anchors(record=bytes.fromhex(r.record_id))
                    tx_id = anchors[0]["tx_id"].hex() if anchors else pending.get(r.record_id)
                    outcome.records[i] = replace(r, tx_id=tx_id)
        deferred = self._offer(outcome.transactions)
        self.log.info("records.recorded", records=sum(r.status == "recorded" for r in outcome.records),
                      unchanged=sum(r.status == "already_recorded" for r in outcome.records),
                      skipped=len(outcome.skipped), deferred=deferred, checked_ahead=checked,
                      seconds=round(time.monotonic() - started, 3))
        return outcome

    async def _prepare_and_write(self, items: Sequence[fhir.Item], skip_invalid: bool, inputs: list[bytes],
                                 actor: bytes, ahead: Callable[[], Awaitable[Sequence[Checked]]] | None,
                                 ) -> tuple[Outcome, int]:
        """Wait for the validation ahead, then validate the rest of ``items``, de-identify them and
        write them, while the other members evaluate the OPRF ``inputs`` (a round trip, and their
        CPU): the first failure of the two is raised, input problems first. Also answers how many
        items were validated ahead. Only preparing and writing hold the vault's lock."""
        evaluated: dict[bytes, bytes] = {}
        failed: list[Exception] = []
        checked: Sequence[Checked] = ()
        evaluation_done = trio.Event()
        outcome: Outcome | None = None

        async def evaluate() -> None:
            try:
                evaluated.update(await self.hooks.evaluate(inputs, actor))
            except Exception as exc:  # noqa: BLE001 - raised below, once preparing is done or failed
                failed.append(exc)
            finally:
                evaluation_done.set()

        async with trio.open_nursery() as nursery:
            if inputs:
                nursery.start_soon(evaluate)
            else:
                evaluation_done.set()
            try:
                if ahead is not None:
                    checked = await ahead()
                async with self._lock:  # nothing else writes the vault between preparing and writing
                    prepared = await trio.to_thread.run_sync(lambda: self.recorder.prepare(
                        items, skip_invalid=skip_invalid, now_ms=int(time.time() * 1000), checked=checked))
                    await evaluation_done.wait()
                    if not failed:
                        outcome = await trio.to_thread.run_sync(lambda: self.recorder.write(
                            prepared, actor=actor, evaluated=evaluated))
            except Exception as exc:  # noqa: BLE001 - raised below, after the evaluation is stopped
                nursery.cancel_scope.cancel()
                failed.insert(0, exc)
        if failed:
            raise failed[0]
        assert outcome is not None
        return outcome, len(checked)

    def _offer(self, txs: Sequence[Transaction]) -> int:
        """Hand anchors to the mempool; returns how many must wait in the outbox."""
        deferred = 0
        for tx in txs:
            try:
                self.hooks.submit(tx)
            except AdmissionError as exc:
                if exc.reason != "duplicate":
                    deferred += 1
        return deferred

    async def run_outbox(self) -> None:
        """Offer outbox transactions again until each is committed, and copy the vault's
        write-ahead log into its file after the writes since (:meth:`Vault.checkpoint`); runs for
        the node's lifetime."""
        while True:
            await trio.sleep(OUTBOX_INTERVAL)
            try:
                await self._blocking(self.vault.checkpoint)
            except StoreError as exc:
                # A full disk, say: the log keeps every commit meanwhile; the next round tries again.
                self.log.warning("vault.checkpoint_failed", error=str(exc))
            rows = await self._blocking(self.vault.outbox)
            done, again = [], []
            for tx_id, data in rows:
                status = self.hooks.state.tx_status(tx_id)
                if status is not None:
                    done.append(tx_id)
                    if status != "ok":
                        # Refused on chain (by every node alike): offering it again cannot help.
                        tx = Transaction.decode(data)
                        self.log.error("records.anchor_refused", tx_id=tx_id.hex(), status=status, kind=tx.kind,
                                       records=[a["record"].hex() for a in anchors_of(tx)] or None)
                elif not self.hooks.pending(tx_id):
                    again.append(Transaction.decode(data))
            if again:
                deferred = self._offer(again)
                self.log.info("records.anchors_offered", offered=len(again), deferred=deferred)
            if done:
                await self._blocking(self.vault.clear_outbox, done)

    # --- reading ------------------------------------------------------------------------

    async def show(self, record_id: bytes) -> dict[str, Any]:
        """One of this institution's records, raw and released (raises KeyError if not ours)."""
        header, raw, released, salt = await self._blocking(self.vault.read, record_id)
        anchors = self.hooks.state.anchors(record=record_id)
        return {
            "record_id": record_id.hex(), "patient": header.patient.hex(),
            "empi": self.hooks.state.empi.empi_of(scoped_enrolment(self.name, header.patient)),
            "resource_type": header.resource_type,
            "position": header.position, "recorded_at": header.recorded_at, "setting": header.setting,
            "commitment": header.commitment.hex(), "anchor": anchor_view(anchors[0]) if anchors else None,
            "resource": raw, "deidentified": released, "salt": salt.hex(),
        }

    async def release(self, record_id: bytes) -> tuple[Any, bytes, bytes]:
        """(header, canonical release bytes, salt) of one of our records, for a pull.

        Read on the event loop, not in a worker thread: one indexed row and one small
        decryption cost less than the hand-off (a 2.5 MB release decrypts in about 2 ms).
        """
        async with self._lock:
            return self.vault.release(record_id)

    async def erase(self, record_id: bytes, reason: str, actor: bytes = b"") -> Transaction:
        """Crypto-shred one of our anchored records and queue its ``record.erase`` (raises KeyError,
        IntegrityError ``already_erased`` / ``not_anchored``)."""
        anchors = self.hooks.state.anchors(record=record_id, institution=self.name)
        if not anchors:
            if await self._blocking(self.vault.state_of, record_id) is None:
                raise KeyError(record_id.hex())
            raise IntegrityError(f"record {record_id.hex()} is not anchored on chain yet: erase it once it is",
                                 reason="not_anchored")
        now = int(time.time() * 1000)
        tx = Transaction.create("record.erase", {
            "epoch": 0, "record": record_id, "reason": crypto.sha256(reason.encode("utf-8")),
        }, chain_id=self.hooks.state.chain_id, submitter=self.name, identity=self.member.identity, time_ms=now,
            actor=actor)
        await self._blocking(self.vault.erase, record_id, reason, now, tx.id, tx.encoded)
        self.log.warning("records.erased", record_id=record_id.hex(), tx_id=tx.id.hex())
        self._offer([tx])
        return tx

    async def verify(self, *, decrypt: bool = True) -> dict[str, Any]:
        anchored = self.hooks.state.anchored_positions(self.name)
        erased = frozenset(e["record"] for e in self.hooks.state.access.erasures(owner=self.name))
        keys = self.hooks.state.governance.signing_keys_of(self.name) | {self.member.identity.public_key}
        report = await self._blocking(self.vault.verify, keys, anchored, decrypt=decrypt, erased=erased)
        (self.log.info if report["ok"] else self.log.error)(
            "vault.verified", ok=report["ok"], entries=report["entries"], problems=len(report["problems"]))
        return report

    async def lookup(self, patient: dict[str, Any]) -> dict[str, Any]:
        """The EMPI a FHIR Patient would get (certain / probable / possible), without enrolling it."""
        demo = Demographics.from_fhir(patient)
        encodings = self.recorder.encoder.encode(demo, await self.hooks.evaluate(self.recorder.encoder.inputs(demo),
                                                                                 b""))
        return self.hooks.state.empi.lookup(encodings)

    async def kanon_report(self) -> dict[str, Any]:
        def released() -> list[tuple[Any, ...]]:
            return list(self.vault.released().values())

        return deid_module.kanon_report(await self._blocking(released), self.profile.k)


def anchor_view(anchor: dict[str, Any]) -> dict[str, Any]:
    return {
        "record_id": anchor["record"].hex(), "empi": anchor["empi"], "patient": anchor["patient"].hex(),
        "institution": anchor["institution"],
        "recorded_at": anchor["recorded_at"], "setting": anchor["setting"], "resource_type": anchor["resource_type"],
        "commitment": anchor["commitment"].hex(), "position": anchor["position"], "height": anchor["height"],
        "tx_id": anchor["tx_id"].hex(),
    }

