"""An owner's decisions batched: who waits for whom, and nothing left behind (on a mock clock)."""

from functools import partial

import pytest
import trio

from ehrnode import crypto
from ehrnode.errors import AdmissionError
from ehrnode.ledger.transactions import MAX_DECISIONS, Transaction
from ehrnode.sharing.decisions import GAP, WINDOW, DecisionBatcher

IDENTITY = crypto.Identity.generate()


class Submitted:
    def __init__(self, error: AdmissionError | None = None) -> None:
        self.batches: list[list[int]] = []
        self.error = error

    def __call__(self, kind, body):
        assert kind == "access.logs"
        if self.error is not None:
            raise self.error
        self.batches.append([d["n"] for d in body["decisions"]])
        # Bodies are not checked here: the batcher never looks inside a decision.
        return Transaction("access.logs", "chain", "A", len(self.batches), bytes(16), body, bytes(64))


async def pull(batcher, n, results, *, delay=0.0, leave=False, hold=None):
    with batcher.deciding() as deciding:
        await trio.sleep(delay)
        if hold is not None:
            await hold.wait()
        if leave:
            return
        tx = await batcher.log({"n": n}, deciding)
        results[n] = (tx.time, trio.current_time())


async def test_pulls_deciding_together_share_one_transaction(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(partial(pull, batcher, n, results, delay=WINDOW / 10 * n))
    assert submit.batches == [[0, 1, 2]]
    # Sent as the last deciding pull joined, not at the window's end.
    assert max(t for _, t in results.values()) == pytest.approx(WINDOW / 10 * 2)


async def test_a_pull_decided_alone_waits_for_nothing(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    await pull(batcher, 7, results)
    assert submit.batches == [[7]] and results[7][1] == 0


async def test_a_pull_that_leaves_without_a_decision_releases_the_batch(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull, batcher, 0, results)
        nursery.start_soon(partial(pull, batcher, 1, results, delay=WINDOW / 2, leave=True))
    assert submit.batches == [[0]] and results[0][1] == pytest.approx(WINDOW / 2)


async def test_a_slow_pull_holds_the_batch_at_most_one_window(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull, batcher, 0, results)
        nursery.start_soon(partial(pull, batcher, 1, results, hold=hold))
        await trio.sleep(1.0)
        hold.set()
    assert submit.batches == [[0], [1]]
    assert results[0][1] == pytest.approx(WINDOW) and results[1][1] == pytest.approx(1.0)


async def test_a_full_batch_goes_at_once_and_the_rest_follow(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    count = MAX_DECISIONS + 5
    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(partial(pull, batcher, n, results, delay=0.0001 * n))
    assert [len(b) for b in submit.batches] == [MAX_DECISIONS, 5]
    assert sorted(n for b in submit.batches for n in b) == list(range(count))


async def test_a_refused_submission_reaches_every_pull_of_the_batch(autojump_clock):
    submit = Submitted(AdmissionError("full", reason="mempool_full"))
    batcher = DecisionBatcher(submit)
    errors = []

    async def failing(n):
        try:
            await pull(batcher, n, {})
        except AdmissionError as exc:
            errors.append(exc.reason)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(failing, n)
    assert errors == ["mempool_full"] * 3


async def test_a_cancelled_first_pull_does_not_strand_the_others(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    hold = trio.Event()
    first = trio.CancelScope()

    async def opener():
        with first:
            await pull(batcher, 0, results, delay=WINDOW / 100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(pull, batcher, 9, results, hold=hold))  # keeps the batch waiting
        nursery.start_soon(opener)
        nursery.start_soon(partial(pull, batcher, 1, results, delay=WINDOW / 4))
        await trio.sleep(WINDOW / 2)
        first.cancel()
        await trio.sleep(1.0)
        hold.set()
    # The first pull's cancellation sent the batch it opened, with the second pull in it.
    assert submit.batches == [[0, 1], [9]]
    assert 1 in results and 0 not in results


async def test_a_decision_logged_again_goes_alone_at_once(autojump_clock):
    submit = Submitted()
    batcher = DecisionBatcher(submit)
    tx = await batcher.log({"n": 4}, None)
    assert submit.batches == [[4]] and tx.time == 1 and trio.current_time() == 0


async def test_after_a_batch_decisions_gather_until_the_gap_has_passed(autojump_clock):
    submit, results = Submitted(), {}
    batcher = DecisionBatcher(submit)
    await pull(batcher, 0, results)  # nothing sent lately: at once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(pull, batcher, 1, results, delay=GAP / 5))
        nursery.start_soon(partial(pull, batcher, 2, results, delay=GAP / 2))
    assert submit.batches == [[0], [1, 2]]
    assert results[0][1] == 0 and results[1][1] == results[2][1] == pytest.approx(GAP)
    await trio.sleep(GAP)  # a quiet gap: the next decision goes at once again
    start = trio.current_time()
    await pull(batcher, 3, results)
    assert submit.batches[-1] == [3] and results[3][1] == start


async def test_on_a_chain_of_rules_1_each_decision_is_an_access_log_of_its_own(autojump_clock):
    kinds = []

    def submit(kind, body):
        kinds.append((kind, body.get("n")))
        return Transaction(kind, "chain", "A", len(kinds), bytes(16), body, bytes(64))

    batcher = DecisionBatcher(submit, batched=False)
    results = {}
    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(pull, batcher, n, results)
    assert sorted(kinds) == [("access.log", 0), ("access.log", 1), ("access.log", 2)]
    assert all(t == 0 for _, t in results.values())  # nothing waited
