"""The requester's handling of answers, with the owner and the chain stood in for."""

import pytest
import trio

from ehrnode import crypto
from ehrnode.errors import PullError
from ehrnode.ledger.requests import request_id
from ehrnode.sharing.messages import PullAnswer
from ehrnode.sharing.requester import Puller, RequesterHooks


class Genesis:
    chain_id = "chain"


class State:
    def anchors(self, record):
        return [{"record": record, "institution": "A", "commitment": b"c" * 32}]


def make_puller(sent):
    async def wait_committed(tx_id, timeout):
        return None

    hooks = RequesterHooks(send=lambda owner, data: sent.append((owner, data)) or True, submit=None,
                           wait_committed=wait_committed, counters=lambda outcome: None)
    return Puller(name="B", genesis=Genesis(), member=crypto.MemberKeys(crypto.Identity.generate(),
                  crypto.SealingKey.generate()), state=State(), hooks=hooks)


@pytest.mark.parametrize("answers", [
    # parts 0 and 2 of 3, then a one-part refusal: a gap, and a status change mid-answer
    [("A", 0, 3, "served"), ("A", 2, 3, "rejected")],
    # a refusal claiming two parts
    [("A", 0, 2, "refused")],
    # part 1 of 2 twice
    [("A", 1, 2, "served"), ("A", 1, 2, "served")],
])
async def test_answers_whose_parts_do_not_fit_are_a_clear_error(answers):
    sent = []
    puller = make_puller(sent)
    outcome = {}

    async def pull():
        with pytest.raises(PullError) as error:
            await puller.pull(b"r" * 16, "treatment", 5, user=b"u" * 15, role="clinician")
        outcome["reason"] = error.value.reason

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull)
        while not sent:
            await trio.sleep(0.01)
        rid = request_id(sent[0][1])
        # Another member's answer to our request, and an answer to a request never made, are ignored.
        assert not puller.on_answer("C", PullAnswer(rid, "served", "granted", "", b"a" * 32, 0, 1, b"x").encode())
        assert puller.on_answer("A", PullAnswer(b"z" * 32, "served", "granted", "", b"", 0, 1, b"x").encode())
        for peer, part, parts, status in answers:
            puller.on_answer(peer, PullAnswer(rid, status, "x", "", b"a" * 32, part, parts, b"data").encode())
    assert outcome["reason"] == "bad_answer"
    assert not puller._pending
