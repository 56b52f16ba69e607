"""Holdings: what each key holds now, forgetting keys that hold nothing."""

from ehrnode.limits import Holdings


def test_holdings_count_per_key_and_forget_a_key_that_holds_nothing():
    held = Holdings()
    held.take("A")
    held.take("A")
    held.take("B")
    assert (held.of("A"), held.of("B"), held.of("C")) == (2, 1, 0)
    held.release("A")
    held.release("B")
    held.release("B")  # released more than taken: never below zero
    assert (held.of("A"), held.of("B")) == (1, 0)
    held.release("A")
    assert held._held == {}
