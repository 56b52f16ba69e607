"""Staged input validated ahead: what ``records.add`` takes of it."""

import trio
import trio.testing

from ehrnode.api.call import StagedCheck
from ehrnode.api.records import _check_ahead, _checked_ahead


def _check(start, results, *, done=True):
    check = StagedCheck(start, len(results) if results is not None else 1, results=results)
    if done:
        check.done.set()
    return check


def test_parts_validated_ahead_count_from_the_first_item_up_to_the_first_that_failed():
    parts = [_check(0, [b"a", b"b"]), _check(2, [b"c"]), _check(3, None), _check(4, [b"e"])]
    assert trio.run(_checked_ahead, parts) == [b"a", b"b", b"c"]
    # A part not starting where the results so far end (one staged before a refusal, say) ends them.
    assert trio.run(_checked_ahead, [_check(0, [b"a"]), _check(5, [b"f"])]) == [b"a"]
    assert trio.run(_checked_ahead, [_check(1, [b"b"])]) == []
    # A part with fewer results than items is not trusted either.
    short = StagedCheck(0, 3, results=[b"a"])
    short.done.set()
    assert trio.run(_checked_ahead, [short]) == []


def test_records_add_waits_for_a_part_still_being_validated():
    async def main():
        late = _check(1, None, done=False)

        async def finish():
            await trio.sleep(0.05)
            late.results = [b"b"]
            late.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            return await _checked_ahead([_check(0, [b"a"]), late])

    assert trio.run(main) == [b"a", b"b"]


class _Api:
    def __init__(self):
        self.checking_ahead = 0
        self.warnings = []
        self.log = self

    def warning(self, event, **fields):
        self.warnings.append((event, fields))


class _Records:
    def __init__(self, fail=False):
        self.fail, self.asked, self.gate = fail, [], trio.Event()

    async def check(self, items):
        self.asked.append(list(items))
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("the worker pool broke")
        return [b"ok-" + item.encode() for item in items]


class _Call:
    def __init__(self, nursery, records, api):
        from ehrnode.api.call import Staged

        self.session = type("S", (), {"staged": Staged(), "nursery": nursery})()
        self.api, self._records = api, records

    def recording(self):
        return self._records

    def stage(self, items):
        start = len(self.session.staged.items)
        self.session.staged.items.extend(items)
        _check_ahead(self, start)


def test_parts_are_validated_ahead_in_order_within_the_node_wide_bound(monkeypatch):
    monkeypatch.setattr("ehrnode.api.records.MAX_CHECKING_AHEAD", 5)

    async def main():
        api, records = _Api(), _Records()
        async with trio.open_nursery() as nursery:
            first, second = _Call(nursery, records, api), _Call(nursery, records, api)
            first.stage(["a", "b", "c"])
            second.stage(["x", "y", "z"])          # 3 + 3 > 5: left to its records.add
            second.stage(["w"])                    # and so is every part after it
            first.stage(["d", "e"])                # 3 + 2 <= 5: validated ahead
            await trio.testing.wait_all_tasks_blocked()
            # (started in either order: trio runs tasks that are ready at once in no fixed order)
            assert sorted(records.asked) == [["a", "b", "c"], ["d", "e"]] and api.checking_ahead == 5
            assert second.session.staged.checks == []
            records.gate.set()
            got = await _checked_ahead(first.session.staged.checks)
            await trio.testing.wait_all_tasks_blocked()
            assert api.checking_ahead == 0
            return got

    assert trio.run(main) == [b"ok-a", b"ok-b", b"ok-c", b"ok-d", b"ok-e"]


def test_a_part_that_could_not_be_validated_ahead_is_left_to_records_add():
    async def main():
        api, records = _Api(), _Records(fail=True)
        async with trio.open_nursery() as nursery:
            call = _Call(nursery, records, api)
            call.stage(["a", "b"])
            records.gate.set()
            got = await _checked_ahead(call.session.staged.checks)
        assert api.checking_ahead == 0
        assert [event for event, _ in api.warnings] == ["records.check_failed"]
        return got

    assert trio.run(main) == []
