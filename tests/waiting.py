"""Waiting in tests for what another task, process or member does: until a condition holds, or
fail once a bound has passed (a bound on a hang, not a timing the test asserts)."""

from functools import partial

import trio


async def until(condition, timeout=10, step=0.01):
    """Return once ``condition()`` holds; raise trio.TooSlowError if it has not after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(step)


def eventually(condition, timeout=60, step=0.05):
    """:func:`until`, from a test that is not async (``condition`` may block: it runs on the loop)."""
    trio.run(partial(until, condition, timeout, step))
