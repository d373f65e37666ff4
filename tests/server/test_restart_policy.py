"""The back-off of ``serve --workers`` when a worker exits on its own (adapters/server/workers.py)."""

from __future__ import annotations

from keymgmt.adapters.server.workers import RestartPolicy


def test_the_wait_doubles_up_to_a_limit_and_too_many_exits_give_up():
    policy = RestartPolicy(first_delay=0.1, max_delay=1.0, window=60.0, max_failures=5)
    assert [policy.failed(float(t)) for t in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.failed(5.0) is None  # the sixth within a minute


def test_exits_spread_out_are_forgiven():
    policy = RestartPolicy(first_delay=0.1, max_delay=5.0, window=60.0, max_failures=2)
    assert policy.failed(0.0) == 0.1
    assert policy.failed(30.0) == 0.2
    assert policy.failed(61.0) == 0.2  # the first one is out of the window
    assert policy.failed(200.0) == 0.1  # all of them are
