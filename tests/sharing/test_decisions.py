"""An owner's decisions batched: who waits for whom, and nothing left behind (on a mock clock)."""

from functools import cache, partial

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


class _Access:
    def __init__(self):
        self.logged = {}  # request id -> rows

    def accesses(self, request=None):
        return self.logged.get(request, [])


class _State:
    rules = 2

    def __init__(self):
        self.access = _Access()


def _owner(statuses):
    """A PullServer whose chain gives each submitted transaction the status ``statuses(tx)``."""
    from ehrnode.sharing.owner import OwnerHooks, PullServer

    sent = []

    def submit(kind, body):
        tx = Transaction.create(kind, body, chain_id="chain", submitter="A", identity=IDENTITY, time_ms=len(sent))
        sent.append(tx)
        return tx

    async def wait_applied(tx_id, timeout):
        await trio.sleep(0.05)  # a block later
        return statuses(next(tx for tx in sent if tx.id == tx_id))

    hooks = OwnerHooks(submit=submit, wait_applied=wait_applied, send=lambda peer, frame: True,
                       counters=lambda outcome: None)
    return PullServer(name="A", genesis=None, state=_State(), records=None, policy=None, hooks=hooks), sent


@cache
def _request(n):
    """A signed request for record n (the same bytes every time: it carries a random nonce)."""
    from ehrnode.ledger.requests import PullRequest

    return PullRequest.create(chain_id="chain", requester="B", user=b"u" * 15, role="clinician", owner="A",
                              record=bytes([n]) * 16, purpose="treatment", time_ms=1, identity=IDENTITY).encode()


async def _answer_both(server, reasons):
    answers = {}

    async def one(n, reason):
        with server.decisions.deciding() as deciding:
            await trio.sleep(0)  # deciding, as the other is
            answers[n] = await server._log_and_answer("B", crypto.sha256(_request(n)), _request(n), reason, b"",
                                                      b"", 0, 0.0, {}, deciding)

    async with trio.open_nursery() as nursery:
        for n, reason in enumerate(reasons):
            nursery.start_soon(one, n, reason)
    return answers


async def test_a_refused_batch_is_logged_again_decision_by_decision_at_once(autojump_clock):
    # The chain refuses any transaction that carries decision 1 (its record was erased meanwhile).
    bad = _request(1)
    server, sent = _owner(lambda tx: "invalid:erased" if any(d["request"] == bad for d in tx.body.get(
        "decisions", [tx.body])) else "ok")
    answers = await _answer_both(server, ["policy", "policy"])
    assert [len(tx.body["decisions"]) for tx in sent] == [2, 1, 1]
    assert answers[0][0].status == "refused" and answers[0][0].access in (sent[1].id, sent[2].id)
    assert answers[1][0].status == "unavailable" and answers[1][0].reason == "access_log_not_committed"
    # Each waited one block for the batch and one for its own: not a commit timeout.
    assert trio.current_time() == pytest.approx(0.1)


async def test_a_decision_the_chain_holds_after_all_is_answered_with_its_log(autojump_clock):
    server, sent = _owner(lambda tx: "invalid:erased" if len(tx.body["decisions"]) > 1 else "ok")
    logged_by = b"\x07" * 32
    server.state.access.logged[crypto.sha256(_request(0))] = [
        {"decision": "refused", "reason": "policy", "tx_id": logged_by}]
    answers = await _answer_both(server, ["policy", "policy"])
    # Decision 0 is on chain (its refused envelope was carried again): answered with that log,
    # not logged a second time; decision 1 is logged again on its own.
    assert answers[0][0].status == "refused" and answers[0][0].access == logged_by
    assert answers[1][0].status == "refused" and answers[1][0].access == sent[1].id
    assert [len(tx.body["decisions"]) for tx in sent] == [2, 1]


async def test_pull_slots_are_taken_as_requests_arrive_so_a_burst_meets_the_member_limit():
    from ehrnode.sharing.owner import MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_MEMBER

    server, _ = _owner(lambda tx: "ok")
    # A burst read in one go: no request's task has run yet.
    limits = [server.take_slot("B") for _ in range(MAX_IN_FLIGHT_PER_MEMBER + 5)]
    assert limits == [None] * MAX_IN_FLIGHT_PER_MEMBER + ["pull_slots_member"] * 5
    others = [server.take_slot(f"M{k % 8}") for k in range(MAX_IN_FLIGHT)]
    assert others.count(None) == MAX_IN_FLIGHT - MAX_IN_FLIGHT_PER_MEMBER
    assert set(others[MAX_IN_FLIGHT - MAX_IN_FLIGHT_PER_MEMBER:]) == {"pull_slots"}
    assert server.in_flight == MAX_IN_FLIGHT
