from ehrnode.consensus.pacemaker import Pacemaker, PacemakerConfig


def test_timeout_backs_off_exponentially_up_to_the_cap():
    pm = Pacemaker(PacemakerConfig(base_timeout=1.0, backoff=2.0, max_timeout=10.0))
    assert pm.duration(5, 4) == 1.0
    assert pm.duration(6, 4) == 2.0
    assert pm.duration(8, 4) == 8.0
    assert pm.duration(9, 4) == 10.0
    assert pm.duration(10**9, 0) == 10.0


def test_rounds_only_move_forward_and_the_timer_fires_once_then_resends():
    pm = Pacemaker(PacemakerConfig(base_timeout=1.0, resend_interval=0.5))
    assert pm.enter(1, 0, now=0.0)
    assert not pm.enter(1, 0, now=0.1)
    assert not pm.expired(0.9)
    assert pm.expired(1.0)
    assert not pm.expired(1.1)
    assert not pm.resend_due(1.2)
    assert pm.resend_due(1.5)
    assert not pm.resend_due(1.6)
    assert pm.next_wakeup() == 2.0
    assert pm.enter(2, 1, now=2.0)
    assert not pm.timed_out and pm.next_wakeup() == 3.0
