"""The OPRF key's rounds as the ledger applies them, against members that misbehave with their own
real keys: dealing out of turn or twice, a dealing of the wrong shape, a bad share to one
participant, a false complaint, a reveal that does not match, and a reshare that does not start
from the dealer's own share."""

import sqlite3

import pytest

from ehrnode import crypto
from ehrnode.config import Address, Member
from ehrnode.empi import dkg, oprf
from ehrnode.ledger.oprf_rounds import PHASE_WINDOW_MS, SCHEMA, OprfRounds
from ehrnode.ledger.transactions import Transaction
from ehrnode.membership import Membership

CHAIN = "chain"
NAMES = ("A", "B", "C", "D", "R")
SIGNING = {n: crypto.Identity.generate() for n in NAMES}
SEALING = {n: crypto.SealingKey.generate() for n in NAMES}


def membership(names, epoch=0):
    return Membership(epoch, 0, tuple(Member(n, "regulator" if n == "R" else "institution", SIGNING[n].public_key,
                                             SEALING[n].public_key, Address("127.0.0.1", 7000)) for n in names))


def tx(kind, body, submitter):
    return Transaction.create(kind, body, chain_id=CHAIN, submitter=submitter, identity=SIGNING[submitter],
                              time_ms=1)


class Chain:
    """The rounds in a database of their own, applied as a block would apply them."""

    def __init__(self, names=("A", "B", "C", "R")):
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        self.db.executescript(SCHEMA)
        self.rounds = OprfRounds(self.db)
        self.height = 1
        self.time = 1_000_000
        self.polynomials: dict[tuple[int, str], list[int]] = {}
        self.rounds.sync(self.db, membership(names), self.height, self.time)

    def apply(self, kind, body, submitter):
        self.height += 1
        self.time += 1000
        return self.rounds.apply(self.db, tx(kind, body, submitter), self.height, self.time)

    def deal(self, dealer, *, secret=None, tamper=None, threshold=None):
        r = self.rounds.latest()
        coefficients = [secret or oprf.random_scalar()] + [oprf.random_scalar()
                                                           for _ in range((threshold or r.threshold) - 1)]
        self.polynomials[(r.number, dealer)] = coefficients
        dealing = dkg.deal_polynomial(CHAIN, r.number, dealer, coefficients,
                                      {n: (r.index(n), k) for n, k in r.participants})
        body = dealing.body(r.number)
        if tamper:       # a share sealed properly, but not the polynomial's value
            body["shares"][tamper] = crypto.seal_to(SEALING[tamper].public_key, oprf.scalar_bytes(12345),
                                                    dkg.share_context(CHAIN, r.number, dealer, tamper))
        return self.apply("keys.oprf_deal", body, dealer)

    def share_of(self, name, number=None):
        """What the node does: open the shares dealt to ``name`` (or the revealed ones) and combine."""
        r = self.rounds.get(number) if number is not None else self.rounds.current()
        revealed = {c["dealer"]: int.from_bytes(c["share"], "big") for c in self.rounds.complaints(r.number)
                    if c["complainer"] == name and c["status"] == "answered"}
        weights = self.rounds.weights(r)
        dealings = self.rounds.dealings(r.number)
        dealt = {}
        for d in r.qualified:
            dealt[d] = revealed.get(d) or dkg.open_share(SEALING[name], CHAIN, r.number, d, name,
                                                         dealings[d]["shares"][name])
        return dkg.combined_share(dealt, weights)


def test_a_fresh_round_completes_and_its_public_shares_are_the_holders_shares():
    chain = Chain()
    r = chain.rounds.latest()
    assert (r.number, r.mode, r.names, r.threshold, r.status) == (0, "fresh", ["A", "B", "C"], 2, "dealing")
    for name in ("A", "B", "C"):
        assert chain.deal(name) == "ok"
    assert chain.rounds.latest().status == "verifying"
    for name in ("A", "B", "C"):
        assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, name) == "ok"
    done = chain.rounds.current()
    assert done.status == "complete" and done.qualified == ("A", "B", "C")
    key = sum(chain.polynomials[(0, d)][0] for d in "ABC") % oprf.ORDER
    assert done.public_key == oprf.encode_point(oprf.base_multiply(key))
    for name in "ABC":
        assert done.public_shares[name] == oprf.encode_point(oprf.base_multiply(chain.share_of(name)))


def test_members_cannot_deal_out_of_turn_twice_or_malformed():
    chain = Chain()
    assert chain.deal("R") == "invalid:not_a_dealer"           # the regulator holds no share
    assert chain.deal("A") == "ok"
    assert chain.deal("A") == "invalid:dealt"
    assert chain.deal("B", threshold=3) == "invalid:malformed_dealing"
    assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "A") == "invalid:not_verifying"
    assert chain.apply("keys.oprf_deal", {"round": 7, "commitments": [], "shares": {"A": b"x"}}, "B") == \
        "invalid:unknown_round"


def test_a_bad_share_is_complained_of_and_a_dealer_that_cannot_answer_is_disqualified():
    chain = Chain()
    chain.deal("A", tamper="B")           # A sends B a share off its polynomial
    chain.deal("B")
    chain.deal("C")
    # B finds it out (as the node does) and complains; B may not complain of itself or a non-dealer.
    r = chain.rounds.latest()
    bad = dkg.open_share(SEALING["B"], CHAIN, 0, "A", "B", chain.rounds.dealings(0)["A"]["shares"]["B"])
    assert not dkg.check_share([oprf.decode_point(c) for c in chain.rounds.dealings(0)["A"]["commitments"]],
                               r.index("B"), bad)
    assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": ["B"]}, "B") == "invalid:not_a_dealer"
    assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": ["A"]}, "B") == "ok"
    assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "A") == "ok"
    assert chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "C") == "ok"
    assert chain.rounds.latest().status == "verifying"        # the complaint is open
    assert chain.rounds.view()["waiting_for"] == ["A"]
    # Only the accused answers, and only an open complaint.
    assert chain.apply("keys.oprf_reveal", {"round": 0, "complainer": "B", "share": b"\x01" * 32}, "C") == \
        "invalid:no_open_complaint"
    # A reveals the same wrong value: it does not match A's commitments, so A is out.
    assert chain.apply("keys.oprf_reveal", {"round": 0, "complainer": "B", "share": oprf.scalar_bytes(12345)},
                       "A") == "ok"
    done = chain.rounds.current()
    assert done.qualified == ("B", "C")
    key = sum(chain.polynomials[(0, d)][0] for d in "BC") % oprf.ORDER
    assert done.public_key == oprf.encode_point(oprf.base_multiply(key))
    for name in "ABC":
        assert done.public_shares[name] == oprf.encode_point(oprf.base_multiply(chain.share_of(name)))


def test_a_false_complaint_is_answered_and_the_dealer_stays():
    chain = Chain()
    for name in "ABC":
        chain.deal(name)
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": ["A"]}, "C")    # C lies
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "A")
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "B")
    true_share = dkg.polynomial_at(chain.polynomials[(0, "A")], 3)
    assert chain.apply("keys.oprf_reveal", {"round": 0, "complainer": "C", "share": oprf.scalar_bytes(true_share)},
                       "A") == "ok"
    assert chain.apply("keys.oprf_reveal", {"round": 0, "complainer": "C", "share": oprf.scalar_bytes(true_share)},
                       "A") == "invalid:not_verifying"      # settled: the round is complete
    done = chain.rounds.current()
    assert done.qualified == ("A", "B", "C")
    assert done.public_shares["C"] == oprf.encode_point(oprf.base_multiply(chain.share_of("C")))


def test_a_reshare_keeps_the_key_and_refuses_a_dealing_not_from_the_dealers_share():
    chain = Chain(("A", "B", "C", "R"))
    for name in "ABC":
        chain.deal(name)
    for name in "ABC":
        chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, name)
    first = chain.rounds.current()
    shares = {n: chain.share_of(n, 0) for n in "ABC"}
    # C leaves, D joins: A and B (2 of the old threshold 2) reshare to A, B, D.
    chain.height += 1
    opened = chain.rounds.sync(chain.db, membership(("A", "B", "D", "R"), epoch=1), chain.height, chain.time)
    assert (opened.number, opened.mode, opened.dealers, opened.names) == (1, "reshare", ("A", "B"), ["A", "B", "D"])
    assert chain.deal("D") == "invalid:not_a_dealer"
    assert chain.deal("A", secret=oprf.random_scalar()) == "invalid:not_the_dealers_share"
    assert chain.deal("A", secret=shares["A"]) == "ok"
    assert chain.deal("B", secret=shares["B"]) == "ok"
    for name in "ABD":
        chain.apply("keys.oprf_verdict", {"round": 1, "complaints": []}, name)
    second = chain.rounds.current()
    assert second.number == 1 and second.public_key == first.public_key
    new = {n: chain.share_of(n, 1) for n in "ABD"}
    for n in "ABD":
        assert second.public_shares[n] == oprf.encode_point(oprf.base_multiply(new[n]))
    # Any two new holders interpolate to the same key; the departed C's old share does not fit in.
    key = (new["B"] * oprf.lagrange_at_zero([2, 3], 2) + new["D"] * oprf.lagrange_at_zero([2, 3], 3)) % oprf.ORDER
    assert oprf.encode_point(oprf.base_multiply(key)) == first.public_key
    mixed = (new["B"] * oprf.lagrange_at_zero([2, 3], 2) + shares["C"] * oprf.lagrange_at_zero([2, 3], 3)) % oprf.ORDER
    assert oprf.encode_point(oprf.base_multiply(mixed)) != first.public_key


def test_a_round_not_finished_when_the_members_change_is_superseded():
    chain = Chain(("A", "B", "C", "R"))
    chain.deal("A")
    chain.height += 1
    opened = chain.rounds.sync(chain.db, membership(("A", "B", "R"), epoch=1), chain.height, chain.time)
    assert opened.mode == "fresh" and opened.number == 1
    assert chain.rounds.get(0).status == "superseded"
    assert chain.deal("B") == "ok" and chain.rounds.latest().number == 1
    # Nothing changes while the membership stays the same (a regulator leaving is not a change of holders).
    assert chain.rounds.sync(chain.db, membership(("A", "B")), chain.height + 1, chain.time) is None


def test_a_member_that_never_takes_part_holds_up_the_key_for_one_window_only():
    chain = Chain(("A", "B", "C", "R"))          # C's node never starts
    chain.deal("A")
    chain.deal("B")
    assert chain.apply("keys.oprf_close", {"round": 0}, "A") == "invalid:not_closable"     # too early
    chain.time += PHASE_WINDOW_MS
    assert chain.apply("keys.oprf_close", {"round": 0}, "R") == "invalid:not_a_participant"
    assert chain.apply("keys.oprf_close", {"round": 0}, "B") == "ok"
    r = chain.rounds.latest()
    assert r.status == "verifying" and r.dealers == ("A", "B")
    assert chain.deal("C") == "invalid:not_dealing"      # too late to deal
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "A")
    assert chain.rounds.view()["waiting_for"] == ["B", "C"]
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "B")
    assert chain.apply("keys.oprf_close", {"round": 0}, "A") == "invalid:not_closable"     # a new window
    chain.time += PHASE_WINDOW_MS
    assert chain.apply("keys.oprf_close", {"round": 0}, "A") == "ok"
    done = chain.rounds.current()
    assert done.qualified == ("A", "B") and done.names == ["A", "B", "C"]
    # C, when it starts, opens the shares dealt to it from the chain: it holds its share too.
    for name in "ABC":
        assert done.public_shares[name] == oprf.encode_point(oprf.base_multiply(chain.share_of(name)))


def test_a_phase_is_not_closed_short_of_the_threshold():
    chain = Chain(("A", "B", "C", "R"))
    chain.deal("A")
    chain.time += PHASE_WINDOW_MS
    assert chain.apply("keys.oprf_close", {"round": 0}, "A") == "invalid:not_closable"   # 1 dealer of 2 needed


def test_a_dealing_that_gives_one_participant_no_share_is_refused():
    # f(x) = a1 * (x - i): zero at participant i's index, so it would have no share and the
    # round's sums could reach the identity, which has no encoding. Every coefficient is nonzero.
    chain = Chain()
    r = chain.rounds.latest()
    a1 = oprf.random_scalar()
    coefficients = [(-a1 * r.index("B")) % oprf.ORDER, a1]
    dealing = dkg.deal_polynomial(CHAIN, 0, "A", coefficients, {n: (r.index(n), k) for n, k in r.participants})
    assert chain.apply("keys.oprf_deal", dealing.body(0), "A") == "invalid:malformed_dealing"


def test_a_dealer_that_never_answers_a_complaint_is_disqualified_after_a_window():
    chain = Chain()
    chain.deal("A", tamper="B")
    chain.deal("B")
    chain.deal("C")
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": ["A"]}, "B")
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "A")
    chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, "C")
    assert chain.apply("keys.oprf_close", {"round": 0}, "B") == "invalid:not_closable"   # A may still answer
    chain.time += PHASE_WINDOW_MS
    assert chain.apply("keys.oprf_close", {"round": 0}, "B") == "ok"
    done = chain.rounds.current()
    assert done.qualified == ("B", "C")
    assert [c["status"] for c in chain.rounds.complaints(0)] == ["unanswered"]
    for name in "ABC":
        assert done.public_shares[name] == oprf.encode_point(oprf.base_multiply(chain.share_of(name)))


def test_a_batch_is_judged_by_the_rounds_completed_by_its_own_block():
    # A node catching up applies the public part of later blocks first: a round completed in a
    # later block must not make a batch for the round before it invalid there and valid elsewhere.
    from ehrnode.ledger.oprf_usage import SCHEMA as USAGE_SCHEMA
    from ehrnode.ledger.oprf_usage import OprfUsage

    chain = Chain()
    chain.db.executescript(USAGE_SCHEMA)
    usage = OprfUsage(chain.db)
    for name in "ABC":
        chain.deal(name)
    for name in "ABC":
        chain.apply("keys.oprf_verdict", {"round": 0, "complaints": []}, name)
    batch_height = chain.height + 1
    # Round 1 (a reshare) completes at a later height, applied before the batch.
    chain.db.execute("INSERT INTO oprf_rounds SELECT 1, mode, participants, threshold, dealers, reshares, opened, "
                     "status, ?, qualified, public_shares, public_key, phase_time FROM oprf_rounds WHERE round = 0",
                     (batch_height + 1,))
    body = {"round": 0, "size": 3, "digest": bytes(32)}
    assert usage.apply(chain.db, tx("empi.oprf_batch", body, "A"), batch_height, chain.time) == "ok"
    assert usage.apply(chain.db, tx("empi.oprf_batch", body, "A"), batch_height + 1, chain.time) == \
        "invalid:not_the_current_round"


@pytest.mark.parametrize("body", [
    {"round": 0, "complaints": ["A", "A"]},
    {"round": 0, "complaints": ["bad name!"]},
])
def test_malformed_verdicts_do_not_decode(body):
    from ehrnode.errors import SchemaError
    with pytest.raises(SchemaError):
        tx("keys.oprf_verdict", body, "A")
