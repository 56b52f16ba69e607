"""Staged input validated, and its Patients evaluated, ahead: which parts are, and what
``records.add`` takes of it."""

import trio
import trio.testing

from ehrnode.api.call import ApiState, Staged, StagedCheck
from ehrnode.api.records import _check_ahead, _checked_ahead, _evaluate_ahead
from ehrnode.records.fhir import Item


def _check(start, results, *, items=None, done=True):
    items = items if items is not None else [f"item{start + i}" for i in range(len(results or [1]))]
    check = StagedCheck(start, items, 1, results=results)
    if done:
        check.done.set()
    return check


def _batch(n):
    return [f"item{i}" for i in range(n)]


def test_parts_validated_ahead_count_from_the_first_item_up_to_the_first_that_failed():
    batch = _batch(6)
    parts = [_check(0, [b"a", b"b"], items=batch[0:2]), _check(2, [b"c"], items=batch[2:3]),
             _check(3, None, items=batch[3:4]), _check(4, [b"e"], items=batch[4:5])]
    assert trio.run(_checked_ahead, parts, batch) == [b"a", b"b", b"c"]
    # A part not starting where the results so far end ends them.
    assert trio.run(_checked_ahead, [_check(0, [b"a"], items=batch[:1]), _check(5, [b"f"], items=batch[5:])],
                    batch) == [b"a"]
    assert trio.run(_checked_ahead, [_check(1, [b"b"], items=batch[1:2])], batch) == []
    # Results count only for the very items validated, where they stand in the input.
    assert trio.run(_checked_ahead, [_check(0, [b"a"], items=["another item"])], batch) == []
    assert trio.run(_checked_ahead, [_check(0, [b"a", b"b"], items=batch[:2])], batch[:1]) == []
    assert trio.run(_checked_ahead, [_check(0, [b"a"], items=batch[:2])], batch) == []  # fewer results than items


def test_records_add_waits_for_a_part_still_being_validated():
    batch = _batch(2)

    async def main():
        late = _check(1, None, items=batch[1:], done=False)

        async def finish():
            await trio.sleep(0.05)
            late.results = [b"b"]
            late.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            return await _checked_ahead([_check(0, [b"a"], items=batch[:1]), late], batch)

    assert trio.run(main) == [b"a", b"b"]


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, event, **fields):
        self.warnings.append((event, fields))


def _api():
    """The API's shared state, with what staging uses of it."""
    api = ApiState.__new__(ApiState)
    api.checking_ahead, api.staged_total, api.log = 0, 0, _Log()
    return api


class _Records:
    """Validates one part at a time, as the records service does, once ``gate`` is set."""

    def __init__(self, fail=False, pooled_from=1):
        self.fail, self.pooled_from, self.asked, self.gate = fail, pooled_from, [], trio.Event()
        self._turn = trio.Lock()

    def checks_ahead(self, count):
        return count >= self.pooled_from

    async def check(self, items, started=lambda: None):
        async with self._turn:
            started()
            self.asked.append(list(items))
            with trio.CancelScope(shield=True):  # a worker thread runs to its end, cancelled or not
                await self.gate.wait()
            if self.fail:
                raise RuntimeError("the worker pool broke")
            return [b"ok-" + item.encode() for item in items]


class _Call:
    def __init__(self, nursery, records, api):
        self.session = type("S", (), {"staged": Staged(), "nursery": nursery})()
        self.api, self._records = api, records

    def recording(self):
        return self._records

    def stage(self, items, size=None):
        start = len(self.session.staged.items)
        self.session.staged.items.extend(items)
        _check_ahead(self, start, len(items) if size is None else size)


def test_parts_are_validated_ahead_in_order_within_the_node_wide_bound(monkeypatch):
    monkeypatch.setattr("ehrnode.api.records.MAX_CHECKING_AHEAD", 5)

    async def main():
        api, records = _api(), _Records()
        async with trio.open_nursery() as nursery:
            first, second = _Call(nursery, records, api), _Call(nursery, records, api)
            first.stage(["a", "b", "c"])
            second.stage(["x", "y", "z"])          # 3 + 3 > 5: left to its records.add
            second.stage(["w"])                    # and so is every part after it
            first.stage(["d", "e"])                # 3 + 2 <= 5: validated ahead
            await trio.testing.wait_all_tasks_blocked()
            assert records.asked == [["a", "b", "c"]]  # one part at a time
            assert api.checking_ahead == 5 and second.session.staged.checks == []
            records.gate.set()
            got = await _checked_ahead(first.session.staged.checks, first.session.staged.items)
            await trio.testing.wait_all_tasks_blocked()
            assert records.asked == [["a", "b", "c"], ["d", "e"]]
            assert api.checking_ahead == len(b"".join(got))  # the results, held until taken
            api.release(first.session.staged, cancel_checks=False)  # as records.add does
            assert api.checking_ahead == 0
            return got

    assert trio.run(main) == [b"ok-a", b"ok-b", b"ok-c", b"ok-d", b"ok-e"]


def test_a_part_too_small_for_the_workers_is_left_to_records_add_and_so_is_the_rest():
    async def main():
        api, records = _api(), _Records(pooled_from=3)
        async with trio.open_nursery() as nursery:
            call = _Call(nursery, records, api)
            call.stage(["a"])
            call.stage(["b", "c", "d"])
            await trio.testing.wait_all_tasks_blocked()
            return records.asked, call.session.staged.checks

    assert trio.run(main) == ([], [])


def test_a_part_that_could_not_be_validated_ahead_is_left_to_records_add():
    async def main():
        api, records = _api(), _Records(fail=True)
        async with trio.open_nursery() as nursery:
            call = _Call(nursery, records, api)
            call.stage(["a", "b"])
            call.stage(["c", "d"])
            call.stage(["e", "f"])
            await trio.testing.wait_all_tasks_blocked()
            records.gate.set()
            got = await _checked_ahead(call.session.staged.checks, call.session.staged.items)
            await trio.testing.wait_all_tasks_blocked()
            call.stage(["g", "h"])
            await trio.testing.wait_all_tasks_blocked()
        # The part begun beside the one that failed runs (its results are not taken); none
        # begins after it.
        assert records.asked == [["a", "b"], ["c", "d"]]
        api.release(call.session.staged)
        assert api.checking_ahead == 0
        assert [event for event, _ in api.log.warnings] == ["records.check_failed"] * 2
        return got

    assert trio.run(main) == []


def test_parts_waiting_for_their_turn_are_cancelled_and_their_memory_counted_until_they_end():
    """``records.add`` cancels the parts not begun (it validates them itself) and waits for the
    one running; dropping the input cancels them all. Either way the bound counts a part until
    its validation has ended."""

    async def main():
        api, records = _api(), _Records()
        async with trio.open_nursery() as nursery:
            call = _Call(nursery, records, api)
            call.stage(["a"], size=10)
            call.stage(["b"], size=20)
            call.stage(["c"], size=30)
            await trio.testing.wait_all_tasks_blocked()
            staged = call.session.staged
            assert [c.began.is_set() for c in staged.checks] == [True, False, False] and api.checking_ahead == 60
            staged.cancel_checks(started=False)     # as records.add does
            await trio.testing.wait_all_tasks_blocked()
            assert api.checking_ahead == 10 and records.asked == [["a"]]
            records.gate.set()
            got = await _checked_ahead(staged.checks, staged.items)
            await trio.testing.wait_all_tasks_blocked()
            api.release(staged, cancel_checks=False)
            assert api.checking_ahead == 0

            dropped = _Call(nursery, _Records(), api)
            dropped.stage(["x"], size=7)
            dropped.stage(["y"], size=8)
            await trio.testing.wait_all_tasks_blocked()
            assert api.checking_ahead == 15
            api.release(dropped.session.staged)  # dropping the input cancels its parts
            await trio.testing.wait_all_tasks_blocked()
            assert api.checking_ahead == 7  # the running one ends when its validation does
            dropped._records.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert api.checking_ahead == 0
            return got

    assert trio.run(main) == [b"ok-a"]


class _Evaluations:
    """Records what is asked for ahead; each evaluation ends once ``gate`` is set."""

    def __init__(self):
        self.asked, self.running, self.gate = [], 0, trio.Event()

    async def evaluate_ahead(self, items, actor):
        self.running += 1
        try:
            assert self.running == 1, "one task a connection"
            self.asked.append(([item.resource["id"] for item in items], actor))
            await self.gate.wait()
        finally:
            self.running -= 1


def _evaluating_call(nursery, records):
    call = type("C", (), {})()
    call.session = type("S", (), {"staged": Staged(), "nursery": nursery})()
    call.user = type("U", (), {"pseudonym": b"clerk"})()
    call.recording = lambda: records

    def stage(*ids):
        start = len(call.session.staged.items)
        call.session.staged.items.extend(
            Item(f"s:{i}", {"resourceType": "Patient" if i.startswith("p") else "Encounter", "id": i}) for i in ids)
        _evaluate_ahead(call, start)

    return call, stage


def test_the_patients_of_staged_parts_are_evaluated_ahead_by_one_task_a_connection():
    async def main():
        records = _Evaluations()
        async with trio.open_nursery() as nursery:
            call, stage = _evaluating_call(nursery, records)
            stage("p1", "e1", "p2")
            await trio.testing.wait_all_tasks_blocked()
            stage("e2", "e3")  # no Patient: nothing to ask for
            stage("p3")
            stage("p4", "e4")
            await trio.testing.wait_all_tasks_blocked()
            assert records.asked == [(["p1", "p2"], b"clerk")]  # the others wait for it to end
            records.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert call.session.staged.evaluation is None
        return records.asked

    assert trio.run(main) == [(["p1", "p2"], b"clerk"), (["p3", "p4"], b"clerk")]


def test_dropping_staged_input_cancels_its_evaluation_ahead_and_records_add_takes_over_the_rest():
    async def main():
        api = _api()
        async with trio.open_nursery() as nursery:
            records = _Evaluations()
            dropped, stage = _evaluating_call(nursery, records)
            stage("p1")
            await trio.testing.wait_all_tasks_blocked()
            stage("p2")
            api.release(dropped.session.staged)  # dropped (too large, refused): nothing goes on
            await trio.testing.wait_all_tasks_blocked()
            assert records.asked == [(["p1"], b"clerk")] and records.running == 0
            assert dropped.session.staged.evaluation is None and dropped.session.staged.to_evaluate == []

            taken_records = _Evaluations()
            taken, stage = _evaluating_call(nursery, taken_records)
            stage("p5")
            await trio.testing.wait_all_tasks_blocked()
            stage("p6")
            api.release(taken.session.staged, cancel_checks=False)  # as records.add takes it
            await trio.testing.wait_all_tasks_blocked()
            assert taken_records.running == 1  # what was asked for goes on: records.add waits for it
            taken_records.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            # p6 was left to records.add, which asks for it itself.
            assert taken_records.asked == [(["p5"], b"clerk")]

    trio.run(main)
