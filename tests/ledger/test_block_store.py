import functools
import sqlite3

import pytest

from ehrnode.consensus.types import ValidatorSet
from ehrnode.errors import StoreError
from ehrnode.ledger.block_store import MemoryBlockStore, SqliteBlockStore

from ..consensus.factory import Factory

F = Factory()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    def make(vset=F.vset):
        if request.param == "memory":
            return MemoryBlockStore(vset)
        return SqliteBlockStore(tmp_path / "blocks.sqlite3", vset)
    return make


def test_commits_are_indexed_by_height_and_survive_reopening(tmp_path):
    b1, b2, b3 = F.chain([1, 2, 3])
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    for b in (b1, b2, b3):
        store.put_block(b)
    store.commit((b1, b2), F.qc(b3))
    store.close()
    reopened = SqliteBlockStore(tmp_path / "b.db", F.vset)
    assert reopened.committed_height() == 2
    assert reopened.block_at(1) == b1 and reopened.block_at(2) == b2
    assert reopened.block_at(0) == F.vset.genesis_block
    rec = reopened.recovery()
    assert rec.root == b2
    assert [b.id for b in rec.blocks] == [b3.id]
    assert rec.high_qc == F.qc(b3)


def test_a_committed_height_is_never_rewritten(make_store):
    store = make_store()
    b1, b2 = F.chain([1, 2])
    store.commit((b1,), F.qc(b2))
    twin = F.block(1, F.genesis_qc, payload=(b"fork",))
    with pytest.raises(StoreError) as err:
        store.commit((twin,), F.qc(b2))
    assert err.value.reason == "commit_gap"
    assert store.block_at(1) == b1
    with pytest.raises(StoreError):
        store.commit((F.block(5, F.qc(b2)),), F.qc(b2))  # skips height 2


def test_recovery_of_an_empty_store_starts_from_genesis(make_store):
    rec = make_store().recovery()
    assert rec.root == F.vset.genesis_block and list(rec.blocks) == [] and rec.high_qc is None


def test_a_store_of_another_chain_is_refused(tmp_path):
    SqliteBlockStore(tmp_path / "b.db", F.vset).close()
    other = ValidatorSet("other", F.vset.keys)
    with pytest.raises(StoreError) as err:
        SqliteBlockStore(tmp_path / "b.db", other)
    assert err.value.reason == "wrong_chain"


def test_a_corrupt_block_is_reported_not_returned(tmp_path):
    (b1,) = F.chain([1])
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    store.put_block(b1)
    store.close()
    db = sqlite3.connect(tmp_path / "b.db")
    db.execute("UPDATE blocks SET body = ?", (b"\xff\x00",))
    db.commit()
    db.close()
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    with pytest.raises(StoreError) as err:
        store.get_block(b1.id)
    assert err.value.reason == "corrupt"


def test_forks_below_a_commit_are_dropped(tmp_path):
    b1, b2 = F.chain([1, 2])
    twin = F.block(1, F.genesis_qc, payload=(b"fork",))
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    for b in (b1, twin, b2):
        store.put_block(b)
    store.commit((b1,), F.qc(b2))
    assert store.get_block(twin.id) is None
    assert store.get_block(b2.id) == b2


def test_forks_at_several_heights_committed_at_once_are_dropped(tmp_path):
    b1, b2, b3 = F.chain([1, 2, 3])
    twins = [F.block(1, F.genesis_qc, payload=(b"fork",)), F.block(2, F.qc(b1), payload=(b"fork",))]
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    for b in (b1, *twins, b2, b3):
        store.put_block(b)
    store.commit((b1, b2), F.qc(b3))
    assert [store.get_block(t.id) for t in twins] == [None, None]
    assert store.get_block(b3.id) == b3


def test_a_commits_work_does_not_grow_with_the_chain(tmp_path):
    """SQLite's own count of the steps one commit takes, on a short chain and on a long one."""
    store = SqliteBlockStore(tmp_path / "b.db", F.vset)
    steps: dict[int, int] = {}

    def count(height: int) -> None:
        steps[height] = steps.get(height, 0) + 1

    qc, previous = F.genesis_qc, None
    for r in range(1, 1_202):
        block = F.block(r, qc)
        store.put_block(block)
        qc = F.qc(block)
        if previous is not None:
            if previous.height in (100, 1_200):
                store._db.set_progress_handler(functools.partial(count, previous.height), 10)
            store.commit((previous,), qc)
            store._db.set_progress_handler(None, 0)
        previous = block
    assert 0 < steps[1_200] < 1.5 * steps[100], steps


WRITER = """
import sys
from ehrnode.ledger.block_store import SqliteBlockStore
from tests.consensus.factory import Factory
f = Factory()
store = SqliteBlockStore(sys.argv[1], f.vset)
qc = f.genesis_qc
previous = None
for r in range(1, 100_000):
    block = f.block(r, qc)
    store.put_block(block)
    qc = f.qc(block)
    if previous is not None:
        store.commit((previous,), qc)
        print(previous.height, flush=True)
    previous = block
"""


def test_the_store_reopens_consistent_after_kill_9_mid_write(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "b.db"
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=root)
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 30:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = SqliteBlockStore(path, F.vset)
    height = store.committed_height()
    assert height >= acknowledged  # every acknowledged commit survived
    for h in range(1, height + 1):
        block = store.block_at(h)
        assert block is not None and block.height == h
        assert block.parent == store.block_at(h - 1).id
    rec = store.recovery()
    assert rec.root.height == height
