"""Staged input validated ahead: what ``records.add`` takes of it."""

import trio

from ehrnode.api.call import StagedCheck
from ehrnode.api.records import _checked_ahead


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
