"""Recording asks the other members for the OPRF outputs of its Patients while it waits for the
validation ahead of its staged parts and while it validates and de-identifies the input, and a
failure of either is reported as it would be alone. Content recorded before is answered with the
transaction anchoring it."""

import threading

import pytest
import trio

from ehrnode.errors import FhirError, KeyUnavailable, StoreError
from ehrnode.records import service as service_module
from ehrnode.records.service import Hooks, RecordsService

PREPARED = object()


class FakeRecorder:
    def __init__(self, prepare):
        self.prepare = prepare

    def write(self, prepared, *, actor, evaluated):
        return prepared, evaluated  # what it was given, as the outcome


def service(prepare, evaluate):
    svc = RecordsService.__new__(RecordsService)  # only what preparing and evaluating use
    svc.recorder = FakeRecorder(prepare)
    svc.hooks = Hooks(submit=None, pending=None, state=None, evaluate=evaluate)
    svc._lock = trio.Lock()
    return svc


async def test_the_evaluation_runs_while_the_input_is_prepared():
    asked = threading.Event()

    def prepare(items, *, skip_invalid, now_ms, checked):
        # Done in a thread: the evaluation must have been asked for before this finishes.
        if not asked.wait(10):
            raise AssertionError("the OPRF evaluation did not start while the input was prepared")
        return PREPARED

    async def evaluate(values, actor):
        asked.set()
        await trio.sleep(0.05)
        return {v: b"out-" + v for v in values}

    (prepared, evaluated), ahead = await service(prepare, evaluate)._prepare_and_write(
        [], False, [b"a", b"b"], b"", None)
    assert prepared is PREPARED and evaluated == {b"a": b"out-a", b"b": b"out-b"} and ahead == 0


async def test_the_evaluation_runs_while_the_validation_ahead_is_awaited():
    asked = trio.Event()
    given = []

    async def ahead():
        # The staged parts still being validated: the evaluation must not wait for them, and
        # nothing else needing the vault waits for them either.
        assert not svc._lock.locked()
        with trio.fail_after(10):
            await asked.wait()
        return [b"{}", b"{}"]

    def prepare(items, *, skip_invalid, now_ms, checked):
        given.append(checked)
        return PREPARED

    async def evaluate(values, actor):
        asked.set()
        return {v: b"out-" + v for v in values}

    svc = service(prepare, evaluate)
    (prepared, evaluated), count = await svc._prepare_and_write([], False, [b"a"], b"", ahead)
    assert prepared is PREPARED and evaluated == {b"a": b"out-a"}
    assert given == [[b"{}", b"{}"]] and count == 2


async def test_no_patient_no_evaluation():
    async def evaluate(values, actor):
        raise AssertionError("nothing to evaluate")

    assert await service(lambda items, skip_invalid, now_ms, checked: PREPARED, evaluate)._prepare_and_write(
        [], False, [], b"", None) == ((PREPARED, {}), 0)


async def test_invalid_input_is_reported_and_stops_the_evaluation():
    stopped = []

    def prepare(items, *, skip_invalid, now_ms, checked):
        raise FhirError("1 invalid resource(s); nothing was recorded", reason="invalid_input")

    async def evaluate(values, actor):
        try:
            await trio.sleep_forever()
        finally:
            stopped.append(True)

    with pytest.raises(FhirError, match="invalid resource"):
        await service(prepare, evaluate)._prepare_and_write([], False, [b"a"], b"", None)
    assert stopped == [True]


async def test_input_problems_come_before_a_failed_evaluation():
    def prepare(items, *, skip_invalid, now_ms, checked):
        raise FhirError("1 invalid resource(s)", reason="invalid_input")

    async def evaluate(values, actor):
        raise KeyUnavailable("no OPRF key yet")

    with pytest.raises(FhirError):
        await service(prepare, evaluate)._prepare_and_write([], False, [b"a"], b"", None)


async def test_a_failed_evaluation_is_raised_once_the_input_is_prepared():
    done = []

    def prepare(items, *, skip_invalid, now_ms, checked):
        done.append(True)
        return PREPARED

    async def evaluate(values, actor):
        raise KeyUnavailable("the holders cannot be reached")

    with pytest.raises(KeyUnavailable, match="holders"):
        await service(prepare, evaluate)._prepare_and_write([], False, [b"a"], b"", None)
    assert done == [True]


class _Chain:
    """What recording reads of the ledger state: anchors committed so far (none, unless given)."""

    rules = 0

    def __init__(self):
        self.committed = {}  # record id -> the transaction id that anchored it

    def highest_position(self, institution):
        return 0

    def anchors(self, *, record):
        return [{"tx_id": self.committed[record]}] if record in self.committed else []


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **fields):
        self.lines.append((event, fields))


def _recording(tmp_path):
    from ehrnode.records.service import RecordsService
    from tests.records.test_recorder import recorder

    svc = RecordsService.__new__(RecordsService)  # a real recorder and vault; the node's side faked
    svc.name, svc.log, svc._lock = "A", _Log(), trio.Lock()
    svc.recorder = recorder(tmp_path)
    svc.vault = svc.recorder.vault
    chain, submitted = _Chain(), []

    async def evaluate(values, actor):
        return {}  # the test's encoder evaluates the OPRF in-process

    svc.hooks = Hooks(submit=submitted.append, pending=lambda tx_id: True, state=chain, evaluate=evaluate)
    return svc, chain, submitted


def test_content_recorded_before_answers_the_transaction_anchoring_it_committed_or_still_in_the_outbox(tmp_path):
    """Recording the same input again records nothing: each row says ``already_recorded`` with the
    transaction anchoring it, committed or still waiting in the outbox."""
    from ehrnode import synthetic
    from tests.records.test_recorder import items

    resources = synthetic.patient_resources(synthetic.people(1, seed=5)[0], "A", visits=2)
    svc, chain, submitted = _recording(tmp_path)

    async def main():
        first = await svc.record(items(resources), skip_invalid=False)
        assert {r.status for r in first.records} == {"recorded"}
        assert len(submitted) == len(first.transactions) > 0
        # One record's anchor committed; the others' still wait in the outbox.
        chain.committed[bytes.fromhex(first.records[0].record_id)] = bytes.fromhex(first.records[0].tx_id)
        again = await svc.record(items(resources), skip_invalid=False)
        return first, again

    first, again = trio.run(main)
    assert [(r.record_id, r.status, r.tx_id) for r in again.records] == \
        [(r.record_id, "already_recorded", r.tx_id) for r in first.records]
    assert again.transactions == [] and svc.vault.count() == len(first.records)
    recorded = [fields for event, fields in svc.log.lines if event == "records.recorded"]
    assert [(r["records"], r["unchanged"]) for r in recorded] == [(len(first.records), 0), (0, len(first.records))]


class UpkeepVault:
    """The vault as the upkeep sees it: an empty outbox, and a checkpoint that fails once (a full
    disk) and then works."""

    def __init__(self):
        self.checkpoints = 0

    def outbox(self):
        return []

    def checkpoint(self):
        self.checkpoints += 1
        if self.checkpoints == 1:
            raise StoreError("cannot checkpoint the vault: database or disk is full")


class Logged:
    def __init__(self):
        self.lines = []

    def warning(self, event, **fields):
        self.lines.append((event, fields))

    info = error = warning


async def test_the_upkeep_checkpoints_the_vault_and_a_failure_does_not_stop_it(monkeypatch):
    """A large ingest leaves its write-ahead log for the upkeep to copy into the vault's file
    (not its own commit): the upkeep does so every round, and a round that cannot (a full disk)
    is logged and tried again, the node staying up."""
    monkeypatch.setattr(service_module, "OUTBOX_INTERVAL", 0.01)
    svc = service(None, None)
    svc.vault, svc.log = UpkeepVault(), Logged()
    with trio.move_on_after(1):
        while svc.vault.checkpoints < 3:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc.run_outbox)
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    assert svc.vault.checkpoints >= 3
    assert [event for event, _ in svc.log.lines] == ["vault.checkpoint_failed"]
    assert "disk is full" in svc.log.lines[0][1]["error"]
