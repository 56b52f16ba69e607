import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode.consensus.safety import MemorySafetyStore, SafetyData, SafetyRules
from ehrnode.errors import SafetyViolation, SchemaError, StoreError

from .factory import Factory

F = Factory()


def rules_for(index=1, store=None):
    store = store or MemorySafetyStore()
    return SafetyRules(F.vset, index, F.identities[index], store), store


class FailingStore(MemorySafetyStore):
    """A store whose writes fail while ``fail`` is set (a full disk)."""

    fail = False

    def save(self, data):
        if self.fail:
            raise StoreError("disk full")
        super().save(data)


def refused(fn):
    with pytest.raises(SafetyViolation) as err:
        fn()
    return err.value.reason


def test_votes_once_per_round_and_returns_the_stored_vote_when_asked_again():
    rules, store = rules_for()
    (b1,) = F.chain([1])
    vote = rules.vote(b1, None)
    saves = store.saves
    twin = F.block(1, F.genesis_qc, payload=(b"other",))
    assert rules.vote(twin, None) == vote  # same round: the stored vote, not a new signature
    assert store.saves == saves
    assert rules.vote(b1, None) == vote


def test_never_votes_in_an_older_round():
    rules, _ = rules_for()
    b1, b2 = F.chain([1, 2])
    rules.vote(b2, None)
    assert refused(lambda: rules.vote(b1, None)) == "old_round"


def test_votes_only_for_a_block_extending_the_previous_rounds_certificate():
    rules, _ = rules_for()
    (b1,) = F.chain([1])
    skipping = F.block(3, F.qc(b1))  # round 3 on a round-1 certificate, no timeout certificate
    assert refused(lambda: rules.vote(skipping, None)) == "unsafe_vote"
    assert rules.data.last_voted_round == 0


def test_after_a_timeout_certificate_votes_only_on_a_certificate_at_least_as_high_as_reported():
    rules, _ = rules_for()
    b1, b2 = F.chain([1, 2])
    q1, q2 = F.qc(b1), F.qc(b2)
    tc = F.tc(3, [q2, q1, q1])
    on_old = F.block(4, q1)
    assert refused(lambda: rules.vote(on_old, tc)) == "unsafe_vote"
    on_highest = F.block(4, q2)
    assert rules.vote(on_highest, tc).round == 4


def test_timeout_needs_a_certificate_for_the_previous_round_and_respects_the_lock():
    rules, _ = rules_for()
    b1, b2 = F.chain([1, 2])
    q1, q2 = F.qc(b1), F.qc(b2)
    assert refused(lambda: rules.timeout(5, q2, None)) == "unjustified_round"
    rules.vote(F.block(3, q2), None)  # locks on round 2
    tc = F.tc(3, [q1, q1, q1])
    assert refused(lambda: rules.timeout(4, q1, tc)) == "below_lock"
    t = rules.timeout(3, q2, None)
    assert rules.timeout(3, q2, None) == t
    # Having timed out of round 3, it must not vote in round 3 any more.
    assert rules.data.last_voted_round == 3


def test_after_timing_out_a_round_a_vote_in_it_is_refused():
    rules, _ = rules_for()
    (b1,) = F.chain([1])
    q1 = F.qc(b1)
    rules.timeout(2, q1, None)
    assert refused(lambda: rules.vote(F.block(2, q1), None)) == "old_round"


def test_state_is_saved_before_the_vote_is_returned():
    store = FailingStore()
    rules, _ = rules_for(store=store)
    store.fail = True
    (b1,) = F.chain([1])
    with pytest.raises(StoreError):
        rules.vote(b1, None)
    assert rules.data.last_voted_round == 0  # nothing signed, nothing remembered
    store.fail = False
    assert rules.vote(b1, None).round == 1
    assert store.data.last_vote.round == 1


def test_a_restart_from_the_store_keeps_every_promise():
    store = MemorySafetyStore()
    rules, _ = rules_for(store=store)
    (b1,) = F.chain([1])
    vote = rules.vote(b1, None)
    restarted, _ = rules_for(store=store)
    twin = F.block(1, F.genesis_qc, payload=(b"equivocation",))
    assert restarted.vote(twin, None) == vote


def test_safety_data_round_trips_through_its_wire_form():
    rules, store = rules_for()
    b1, b2 = F.chain([1, 2])
    rules.vote(b1, None)
    rules.timeout(2, F.qc(b1), None)
    assert SafetyData.from_wire(store.data.to_wire()) == store.data


def test_rules_refuse_an_identity_that_is_not_the_validator():
    with pytest.raises(ValueError):
        SafetyRules(F.vset, 0, F.identities[1], MemorySafetyStore())


@given(st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-5, max_value=2**64) | st.binary(max_size=70)
    | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
        ["epoch", "last_voted_round", "locked_round", "highest_timeout_round", "last_vote", "last_timeout",
         "data", "author", "sig", "round", "high_qc", "block", "height", "parent", "parent_round", "sigs"]), c,
        max_size=8),
    max_leaves=25,
))
@settings(max_examples=300)
def test_safety_data_decoding_fails_only_with_schema_errors(value):
    try:
        SafetyData.from_wire(value)
    except SchemaError:
        pass


def test_deferred_writes_once_on_leaving_even_when_an_error_ends_it():
    rules, store = rules_for()
    b1, b2 = F.chain([1, 2])
    saves = store.saves
    with pytest.raises(RuntimeError), rules.deferred():
        rules.vote(b1, None)
        with rules.deferred():  # nested: still one write, at the outer end
            rules.vote(b2, None)
        assert store.saves == saves
        raise RuntimeError("the input failed after signing")
    assert store.saves == saves + 1
    assert store.data.last_vote.round == 2  # what was signed is known, whatever became of it
    with rules.deferred():
        pass
    assert store.saves == saves + 1  # nothing changed: nothing written


def test_a_deferred_write_that_fails_forgets_what_was_signed_inside():
    store = FailingStore()
    rules, _ = rules_for(store=store)
    (b1,) = F.chain([1])
    store.fail = True
    with pytest.raises(StoreError), rules.deferred():
        rules.vote(b1, None)
    assert rules.data.last_voted_round == 0 and rules.data.last_vote is None  # as on disk
    store.fail = False
    with rules.deferred():
        vote = rules.vote(b1, None)  # signed anew, and written this time
    assert store.data.last_vote == vote

