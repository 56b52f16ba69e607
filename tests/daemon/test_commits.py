"""The subscribers to committed blocks: in order, each failing alone; waiters woken by their commit."""

from types import SimpleNamespace

import pytest
import trio

from ehrnode.daemon.commits import Commits, TxWaiters
from ehrnode.errors import StoreError


class Log:
    def __init__(self):
        self.errors = []

    def error(self, event, **fields):
        self.errors.append((event, fields))


def test_a_failing_subscriber_is_logged_and_the_others_still_run():
    log, seen = Log(), []
    commits = Commits(log)
    commits.subscribe("first.failed", lambda block, txs: seen.append(("first", block.height)))
    commits.subscribe("broken.failed", lambda block, txs: 1 / 0)
    commits.subscribe("last.failed", lambda block, txs: seen.append(("last", len(txs))))
    commits.committed(SimpleNamespace(height=7), [SimpleNamespace(id=b"t")])
    assert seen == [("first", 7), ("last", 1)]
    assert [(event, fields["height"]) for event, fields in log.errors] == [("broken.failed", 7)]
    assert "ZeroDivisionError" in log.errors[0][1]["error"]


def test_a_failing_disk_stops_the_node_rather_than_being_logged():
    def disk_full(block, txs):
        raise StoreError("disk full")

    commits = Commits(Log())
    commits.subscribe("disk.failed", disk_full)
    with pytest.raises(StoreError):
        commits.committed(SimpleNamespace(height=1), [])


async def test_a_waiter_gets_the_height_its_transaction_committed_at():
    heights = {b"old": 3}
    waiters = TxWaiters(heights.get, lambda tx_id: None, lambda height: [])
    assert await waiters.wait(b"old", 0) == 3  # committed before anyone waited
    assert await waiters.wait(b"never", 0.01) is None

    got = []
    async with trio.open_nursery() as nursery:
        async def wait():
            got.append(await waiters.wait(b"new", 5))
        nursery.start_soon(wait)
        await trio.sleep(0.01)
        waiters.committed(SimpleNamespace(height=9), [SimpleNamespace(id=b"other"), SimpleNamespace(id=b"new")])
    assert got == [9]


async def test_a_refused_transaction_ends_wait_applied_as_soon_as_its_block_commits(autojump_clock):
    statuses, blocks = {b"old": "invalid:erased"}, {}
    waiters = TxWaiters(lambda tx_id: None, statuses.get, lambda height: blocks.get(height, []))
    assert await waiters.wait_applied(b"old", 0) == "invalid:erased"
    got = []
    async with trio.open_nursery() as nursery:
        async def wait():
            got.append((await waiters.wait_applied(b"new", 30), trio.current_time()))
        nursery.start_soon(wait)
        await trio.sleep(1)
        # The refused transaction is not among the block's valid ones, only among its entries.
        statuses[b"new"] = "invalid:erased"
        blocks[4] = [(b"other", "ok"), (b"new", "invalid:erased")]
        waiters.committed(SimpleNamespace(height=4), [SimpleNamespace(id=b"other")])
    assert got == [("invalid:erased", 1)]


async def test_a_waiter_that_gives_up_first_leaves_the_others_waiting(autojump_clock):
    statuses = {}
    waiters = TxWaiters({}.get, statuses.get, lambda height: [(b"tx", "ok")])
    got = []
    async with trio.open_nursery() as nursery:
        async def wait(kind, timeout):
            if kind == "committed":
                got.append((kind, timeout, await waiters.wait(b"tx", timeout)))
            else:
                got.append((kind, timeout, await waiters.wait_applied(b"tx", timeout)))
        for kind in ("committed", "applied"):
            nursery.start_soon(wait, kind, 1)
            nursery.start_soon(wait, kind, 30)
        await trio.sleep(2)  # the first of each kind gave up
        statuses[b"tx"] = "ok"
        waiters.committed(SimpleNamespace(height=5), [SimpleNamespace(id=b"tx")])
    assert sorted(got) == [("applied", 1, None), ("applied", 30, "ok"), ("committed", 1, None),
                           ("committed", 30, 5)]


def test_the_subscribers_furthest_behind_are_closed_past_the_budget_of_all(monkeypatch):
    from ehrnode.daemon import commits
    from ehrnode.sharing.events import Subscription

    monkeypatch.setattr(commits, "EVENTS_QUEUED", 10)
    warnings = []
    feed = commits.EventFeed("A", None, SimpleNamespace(warning=lambda event, **f: warnings.append(event)), limit=8)
    receivers = [feed.subscribe(Subscription(frozenset(), True)) for _ in range(3)]
    for (_, channel), backlog in zip(feed._subscriptions, (6, 2, 5), strict=True):
        for n in range(backlog):
            channel.send_nowait({"n": n})
    feed._bound(height=1)  # 13 queued: the one 6 behind goes, 7 are left
    assert [r.statistics().current_buffer_used for r in receivers] == [6, 2, 5]
    assert [c.statistics().open_receive_channels for _, c in feed._subscriptions] == [1, 1]
    assert [len(list(r.receive_nowait() for _ in range(r.statistics().current_buffer_used))) for r in receivers[1:]] \
        == [2, 5]
    with pytest.raises(trio.EndOfChannel):
        for _ in range(7):
            receivers[0].receive_nowait()
    assert warnings == ["events.subscriber_closed"]


def test_the_subscriptions_counted_open_are_those_a_client_still_reads():
    from ehrnode.daemon import commits
    from ehrnode.sharing.events import Subscription

    feed = commits.EventFeed("A", None, SimpleNamespace(), limit=8)
    assert feed.open == 0
    receivers = [feed.subscribe(Subscription(frozenset(), True)) for _ in range(3)]
    assert feed.open == 3
    receivers[1].close()  # that client went away
    assert feed.open == 2


def test_each_wanted_transaction_is_acted_on_and_fails_alone():
    log, acted = Log(), []
    commits = Commits(log)

    def act(tx):
        if tx.id == b"bad":
            raise ValueError("no")
        acted.append(tx.id)

    commits.subscribe_each("answer.failed", lambda tx: tx.id != b"skip", act)
    commits.committed(SimpleNamespace(height=4), [SimpleNamespace(id=i) for i in (b"one", b"bad", b"skip", b"two")])
    assert acted == [b"one", b"two"]
    assert [(e, f["height"], f["request"]) for e, f in log.errors] == [("answer.failed", 4, b"bad".hex())]
