"""The OPRF requester's cache: a value evaluated once is not asked again, and a value another
request is evaluating is waited for, not asked twice (staged input has its Patients evaluated
while the rest arrives, and recording it then asks for the same values)."""

import pytest
import trio
import trio.testing

from ehrnode.daemon.oprf_service import OprfService
from ehrnode.errors import KeyUnavailable


class _Round:
    number, public_key = 0, b"group key"


class _State:
    class oprf:  # what the service reads of the ledger state
        @staticmethod
        def current():
            return _Round()


class _Log:
    def warning(self, event, **fields):
        pass


def _service(batch):
    service = OprfService("A", "chain", _State(), keys=None, submit=None, wait_committed=None, send_request=None,
                          send_answer=None, connected=lambda: [], daily_quota=100, log=_Log())
    service._batch = batch
    return service


def test_a_value_being_evaluated_is_waited_for_not_asked_again():
    asked, gate = [], trio.Event()

    async def batch(values, actor):
        asked.append(list(values))
        await gate.wait()
        return [b"out-" + v for v in values]

    async def main():
        service = _service(batch)
        got = {}

        async def ask(name, values):
            got[name] = await service.evaluate(values)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "ahead", [b"a", b"b"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "recording", [b"b", b"c"])
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert asked == [[b"a", b"b"], [b"c"]]
        assert got == {"ahead": {b"a": b"out-a", b"b": b"out-b"}, "recording": {b"b": b"out-b", b"c": b"out-c"}}
        # Evaluated once: asked for again, nothing is asked.
        assert await service.evaluate([b"c", b"a"]) == {b"c": b"out-c", b"a": b"out-a"}
        assert len(asked) == 2

    trio.run(main)


def test_a_value_whose_request_failed_is_asked_again_by_the_one_waiting_for_it():
    asked, gate = [], trio.Event()

    async def batch(values, actor):
        asked.append(list(values))
        if len(asked) == 1:
            await gate.wait()
            raise KeyUnavailable("the other holders went away", reason="oprf_unavailable")
        return [b"out-" + v for v in values]

    async def main():
        service = _service(batch)
        got = {}

        async def failing():
            with pytest.raises(KeyUnavailable):
                await service.evaluate([b"a", b"b"])

        async def waiting():
            got["recording"] = await service.evaluate([b"b"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(failing)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiting)
            await trio.testing.wait_all_tasks_blocked()
            assert asked == [[b"a", b"b"]]  # still waiting for the first request
            gate.set()
        assert asked == [[b"a", b"b"], [b"b"]]
        assert got == {"recording": {b"b": b"out-b"}}
        assert service._evaluating == {}

    trio.run(main)


def test_a_cancelled_request_leaves_its_values_to_the_next():
    asked = []

    async def batch(values, actor):
        asked.append(list(values))
        if len(asked) == 1:
            await trio.sleep_forever()
        return [b"out-" + v for v in values]

    async def main():
        service = _service(batch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.evaluate, [b"a"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()       # the connection that asked ahead went away
        assert service._evaluating == {}
        assert await service.evaluate([b"a"]) == {b"a": b"out-a"}
        assert asked == [[b"a"], [b"a"]]

    trio.run(main)


def test_a_waiter_goes_on_once_the_batch_holding_its_value_is_done(monkeypatch):
    monkeypatch.setattr("ehrnode.daemon.oprf_service.MAX_OPRF_BATCH", 1)
    asked, later = [], trio.Event()

    async def batch(values, actor):
        asked.append(list(values))
        if values == [b"b"]:
            await later.wait()
        return [b"out-" + v for v in values]

    async def main():
        service = _service(batch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.evaluate, [b"x", b"a", b"b"])  # three batches of one
            await trio.testing.wait_all_tasks_blocked()
            # "b" is still being asked for; "a" is done: not asked again, and not waited for beyond.
            assert await service.evaluate([b"a"]) == {b"a": b"out-a"}
            assert not later.is_set()
            later.set()
        assert asked == [[b"x"], [b"a"], [b"b"]]

    trio.run(main)


def test_a_value_asked_for_under_a_key_since_replaced_is_asked_again():
    asked, gate = [], trio.Event()
    current = _Round()

    class State:
        class oprf:  # what the service reads of the ledger state
            @staticmethod
            def current():
                return current

    async def batch(values, actor):
        asked.append((list(values), current.public_key))
        if len(asked) == 1:
            await gate.wait()
        return [b"out-" + current.public_key + v for v in values]

    async def main():
        service = OprfService("A", "chain", State(), keys=None, submit=None, wait_committed=None,
                              send_request=None, send_answer=None, connected=lambda: [], daily_quota=100, log=_Log())
        service._batch = batch
        got = {}

        async def waiting():
            got["recording"] = await service.evaluate([b"a"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.evaluate, [b"a"])
            await trio.testing.wait_all_tasks_blocked()
            current.public_key = b"a fresh key"  # a new round's key, while "a" is asked for
            nursery.start_soon(waiting)  # under the new key: the old key's answer will not do
            await trio.testing.wait_all_tasks_blocked()
            assert len(asked) == 1
            gate.set()
        assert asked == [([b"a"], b"group key"), ([b"a"], b"a fresh key")]
        assert got == {"recording": {b"a": b"out-a fresh keya"}}

    trio.run(main)
