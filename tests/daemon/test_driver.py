"""The driver between the consensus core and the node: in what order it carries out actions."""

from types import SimpleNamespace

import trio

from ehrnode.consensus.core import CommitBlocks, Send, SetTimer
from ehrnode.consensus.messages import VoteMsg, encode_message
from ehrnode.daemon.driver import Driver

from ..consensus.factory import Factory
from ..waiting import until

F = Factory()
B1, B2, B3 = F.chain([1, 2, 3])
VOTE = VoteMsg(F.vote(B3, 1))
MEMBERSHIP = SimpleNamespace(
    members=[SimpleNamespace(name=n) for n in "ABCD"],
    index_of=lambda name: "ABCD".index(name) if name in "ABCD" else None,
)


class Network:
    """Records what is queued, and when the queued frames reach the kernel (``urgent_sent``)."""

    def __init__(self, events: list) -> None:
        self.events = events

    def send(self, name: str, data: bytes, *, bulk: bool = False) -> bool:
        self.events.append(("queued", name))
        return True

    def broadcast(self, data: bytes, *, bulk: bool = False) -> None:
        self.events.append(("queued", "*"))

    def connected(self) -> list[str]:
        return ["A", "B", "C", "D"]

    def kick(self, peer, reason: str) -> None:
        self.events.append(("kicked", reason))

    async def urgent_sent(self, timeout: float) -> None:
        await trio.sleep(0)
        self.events.append(("sent",))


class Core:
    """A core that answers each message with the next of ``answers``."""

    def __init__(self, answers: list[list]) -> None:
        self.answers = answers
        self.vset = F.vset
        self.index = 0

    def on_message(self, sender, message, now):
        return self.answers.pop(0)

    def start(self, now):
        return []

    tick = start

    def set_unreachable(self, validators, now):
        return []

    def on_peer_connected(self, peer, now):
        return []

    def submit(self, txs, now):
        return []


async def drive(answers: list[list], done) -> list:
    """The events of a driver given a vote for each of ``answers``, once ``done(events)`` holds."""
    events: list = []
    log = SimpleNamespace(debug=lambda *a, **k: None, info=lambda *a, **k: None,
                          warning=lambda *a, **k: events.append(("warning", a)), error=lambda *a, **k: None)
    driver = Driver(Core(answers), MEMBERSHIP, network=Network(events),
                    persist=lambda block: events.append(("persist", block.height)),
                    commit=lambda action: events.append(("commit", action.blocks[0].height)),
                    admit=lambda peer, data: True, log=log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        for _ in range(len(answers)):
            driver.consensus(SimpleNamespace(name="B"), encode_message(VOTE))
        await until(lambda: done(events))
        await trio.sleep(0.05)  # anything that would come after
        nursery.cancel_scope.cancel()
    return events


async def test_a_vote_leaves_before_the_commit_that_came_with_it_is_applied():
    # As the core answers a proposal: a commit of the grandparent, then the vote.
    events = await drive([[CommitBlocks((B1,), F.qc(B2)), Send(2, VOTE)]], lambda e: ("commit", 1) in e)
    assert events == [("queued", "C"), ("sent",), ("commit", 1)]


async def test_actions_after_a_held_commit_keep_their_order_across_inputs():
    first = [CommitBlocks((B1,), F.qc(B2)), SetTimer(0.0), Send(2, VOTE)]
    second = [Send(3, VOTE), CommitBlocks((B2,), F.qc(B3))]
    events = await drive([first, second], lambda e: ("commit", 2) in e)
    commits = [e for e in events if e[0] == "commit"]
    assert commits == [("commit", 1), ("commit", 2)]
    assert events.index(("queued", "C")) < events.index(("commit", 1))
    assert events.index(("queued", "D")) < events.index(("commit", 2))


async def test_a_held_commit_that_ends_the_epoch_replaces_the_core_before_its_next_input():
    events: list = []
    old, new = Core([]), Core([[]])
    old.tick = lambda now: [CommitBlocks((B1,), F.qc(B2))]
    old.start = lambda now: [SetTimer(0.0)]  # the tick is due at once
    old.on_message = lambda sender, message, now: events.append("old core") or []
    new.on_message = lambda sender, message, now: events.append("new core") or []
    driver: Driver

    def commit(action):
        events.append("commit")
        driver.succeed(new, MEMBERSHIP)  # the epoch ended with this block

    log = SimpleNamespace(debug=lambda *a, **k: None, info=lambda *a, **k: None, warning=lambda *a, **k: None,
                          error=lambda *a, **k: None)
    driver = Driver(old, MEMBERSHIP, network=Network([]), persist=lambda block: None, commit=commit,
                    admit=lambda peer, data: True, log=log)
    driver.consensus(SimpleNamespace(name="B"), encode_message(VOTE))  # waiting when the tick comes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        await until(lambda: "new core" in events or "old core" in events)
        await trio.sleep(0.05)  # anything that would come after
        nursery.cancel_scope.cancel()
    assert events == ["commit", "new core"]
