"""The threshold OPRF and the sharing of its key, without the chain: the arithmetic holds, a
wrong answer is caught, and fewer shares than the threshold compute nothing useful."""

from __future__ import annotations

import itertools

import pytest

from ehrnode import crypto
from ehrnode.empi import dkg, oprf
from ehrnode.errors import CryptoError, SchemaError

CHAIN = "ehrnode-test"
SSN = b"us-ssn\x1f999123456"


def _fresh_round(names: list[str], threshold: int) -> tuple[dict[str, int], dict[str, oprf.PublicKey], int]:
    """Every participant deals; returns each one's share, public share, and the key (the sum of
    the dealt secrets, which only this test ever adds up)."""
    sealing = {n: crypto.SealingKey.generate() for n in names}
    index = {n: i + 1 for i, n in enumerate(names)}
    recipients = {n: (index[n], sealing[n].public_key) for n in names}
    secrets_ = {n: oprf.random_scalar() for n in names}
    dealings = {n: dkg.deal(CHAIN, 0, n, secrets_[n], threshold, recipients) for n in names}
    for dealing in dealings.values():
        dkg.check_dealing_body(dealing.body(0), threshold, names)
    shares = {}
    for n in names:
        dealt = {}
        for d in names:
            s = dkg.open_share(sealing[n], CHAIN, 0, d, n, dealings[d].shares[n])
            assert dkg.check_share(dealings[d].points(), index[n], s)
            dealt[index[d]] = s
        shares[n] = dkg.combined_share(dealt, {index[d]: 1 for d in names})
    public, key_point = dkg.round_result({index[d]: dealings[d].points() for d in names},
                                         {index[d]: 1 for d in names}, list(index.values()))
    key = sum(secrets_.values()) % oprf.ORDER
    assert key_point == oprf.base_multiply(key)
    for n in names:
        assert public[index[n]] == oprf.base_multiply(shares[n])
    return shares, {n: public[index[n]] for n in names}, key


def _evaluate(names: list[str], shares: dict[str, int], public: dict[str, oprf.PublicKey],
              values: list[bytes], answering: list[str]) -> list[bytes]:
    index = {n: i + 1 for i, n in enumerate(names)}
    blinded = [oprf.blind(v) for v in values]
    points = [b.point for b in blinded]
    answers = {}
    for n in answering:
        evaluated, proof = oprf.evaluate(shares[n], points, b"batch-1")
        assert oprf.verify(public[n], points, evaluated, proof, b"batch-1")
        answers[index[n]] = evaluated
    return oprf.combine(blinded, answers)


def test_any_threshold_of_members_computes_the_function_of_the_key_no_one_holds():
    names = ["A", "B", "C", "D"]
    shares, public, key = _fresh_round(names, 3)
    values = [SSN, b"blocking\x1fS530" + b"1950", b"\xe6\x9d\x8e"]
    expected = [oprf.evaluate_locally(key, v) for v in values]
    for answering in itertools.combinations(names, 3):
        assert _evaluate(names, shares, public, values, list(answering)) == expected
    # Blinding is fresh each time, the output is not.
    assert _evaluate(names, shares, public, [SSN], ["A", "B", "C"])[0] == expected[0]


def test_fewer_than_the_threshold_or_one_members_share_alone_does_not_give_the_pseudonym():
    names = ["A", "B", "C", "D"]
    shares, public, key = _fresh_round(names, 3)
    target = oprf.evaluate_locally(key, SSN)
    # One member with its complete key material: its share used as a key, or the two-share
    # interpolation it could do with one accomplice, gives something else.
    assert oprf.evaluate_locally(shares["A"], SSN) != target
    assert _evaluate(names, shares, public, [SSN], ["A", "B"])[0] != target


def test_a_wrong_answer_is_caught_by_the_proof():
    names = ["A", "B", "C"]
    shares, public, _ = _fresh_round(names, 2)
    points = [oprf.blind(v).point for v in (SSN, b"other")]
    evaluated, proof = oprf.evaluate(shares["A"], points, b"ctx")
    assert oprf.verify(public["A"], points, evaluated, proof, b"ctx")
    # Another member's public share, another batch, a swapped answer, a different key: refused.
    assert not oprf.verify(public["B"], points, evaluated, proof, b"ctx")
    assert not oprf.verify(public["A"], points, evaluated, proof, b"another batch")
    assert not oprf.verify(public["A"], points, list(reversed(evaluated)), proof, b"ctx")
    forged, forged_proof = oprf.evaluate(oprf.random_scalar(), points, b"ctx")
    assert not oprf.verify(public["A"], points, forged, forged_proof, b"ctx")
    assert not oprf.verify(public["A"], points, evaluated[:1], proof, b"ctx")
    assert not oprf.verify(public["A"], points, evaluated, b"\x00" * 64, b"ctx")
    assert not oprf.verify(public["A"], points, evaluated, proof[:10], b"ctx")


def test_resharing_keeps_the_key_and_retires_the_old_shares():
    names = ["A", "B", "C", "D"]
    shares, public, key = _fresh_round(names, 3)
    # D leaves and E, F join: A, B and C deal their shares, weighted by their Lagrange coefficients.
    old_index = {n: i + 1 for i, n in enumerate(names)}
    new_names = ["A", "B", "C", "E", "F"]
    new_index = {n: i + 1 for i, n in enumerate(new_names)}
    new_threshold = dkg.threshold_for(len(new_names))
    sealing = {n: crypto.SealingKey.generate() for n in new_names}
    recipients = {n: (new_index[n], sealing[n].public_key) for n in new_names}
    dealers = ["A", "B", "C"]
    dealings = {d: dkg.deal(CHAIN, 1, d, shares[d], new_threshold, recipients) for d in dealers}
    for d in dealers:      # what the chain checks: the dealing starts from the dealer's public share
        assert dealings[d].points()[0] == public[d]
    weights = {old_index[d]: oprf.lagrange_at_zero([old_index[x] for x in dealers], old_index[d]) for d in dealers}
    new_shares = {}
    for n in new_names:
        dealt = {old_index[d]: dkg.open_share(sealing[n], CHAIN, 1, d, n, dealings[d].shares[n]) for d in dealers}
        new_shares[n] = dkg.combined_share(dealt, weights)
    new_public, key_point = dkg.round_result({old_index[d]: dealings[d].points() for d in dealers}, weights,
                                             list(new_index.values()))
    assert key_point == oprf.base_multiply(key)
    by_name = {n: new_public[new_index[n]] for n in new_names}
    expected = oprf.evaluate_locally(key, SSN)
    assert _evaluate(new_names, new_shares, by_name, [SSN], ["B", "E", "F"])[0] == expected
    # An old share answers for a different polynomial: mixed with new ones it gives garbage.
    mixed = dict(new_shares, F=shares["D"])
    assert _evaluate(new_names, mixed, dict(by_name, F=public["D"]), [SSN], ["B", "E", "F"])[0] != expected


def test_a_share_that_does_not_match_the_commitments_is_found():
    sealing = crypto.SealingKey.generate()
    dealing = dkg.deal(CHAIN, 0, "A", oprf.random_scalar(), 2, {"B": (2, sealing.public_key)})
    share = dkg.open_share(sealing, CHAIN, 0, "A", "B", dealing.shares["B"])
    assert dkg.check_share(dealing.points(), 2, share)
    assert not dkg.check_share(dealing.points(), 3, share)
    assert not dkg.check_share(dealing.points(), 2, share + 1)
    assert not dkg.check_share(dealing.points(), 2, 0)
    with pytest.raises(CryptoError):       # sealed for another round or dealer: does not open
        dkg.open_share(sealing, CHAIN, 1, "A", "B", dealing.shares["B"])


def test_malformed_points_and_dealings_are_refused():
    for bad in (b"", b"\x02" + b"\x00" * 32, b"\x04" + b"\x01" * 32, b"\x02" + b"\xff" * 32, "text"):
        with pytest.raises(CryptoError):
            oprf.decode_point(bad)
    sealing = crypto.SealingKey.generate()
    body = dkg.deal(CHAIN, 0, "A", 5, 2, {"A": (1, sealing.public_key), "B": (2, sealing.public_key)}).body(0)
    dkg.check_dealing_body(body, 2, ["A", "B"])
    with pytest.raises(SchemaError, match="expected 3 points"):
        dkg.check_dealing_body(body, 3, ["A", "B"])
    with pytest.raises(SchemaError, match="each participant"):
        dkg.check_dealing_body(body, 2, ["A", "B", "C"])
    with pytest.raises(SchemaError, match="commitments\\[1\\]"):
        dkg.check_dealing_body(dict(body, commitments=[body["commitments"][0], b"\x02" + b"\xff" * 32]), 2, ["A", "B"])
    with pytest.raises(SchemaError, match="sealed 32-byte share"):
        dkg.check_dealing_body(dict(body, shares={"A": b"x", "B": b"y"}), 2, ["A", "B"])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 64])
def test_threshold_is_a_majority(count):
    t = dkg.threshold_for(count)
    assert t > count / 2 and t <= count


def test_the_requesters_own_share_folds_into_the_combination():
    names = ["A", "B", "C", "D"]
    shares, public, key = _fresh_round(names, 3)
    blinded = [oprf.blind(v) for v in (SSN, b"other")]
    points = [b.point for b in blinded]
    answers = {i: oprf.evaluate(shares[n], points, b"x")[0] for i, n in ((2, "B"), (4, "D"))}
    assert oprf.combine(blinded, answers, own=(1, shares["A"])) == [oprf.evaluate_locally(key, v)
                                                                       for v in (SSN, b"other")]
