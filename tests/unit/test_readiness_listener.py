"""/readyz's listener part (`proxy.admin.listener_problem`): not ready only while every worker's device listener is
full."""

from __future__ import annotations

from proxy.admin import listener_problem


def test_a_lone_gateway_is_not_ready_at_its_limit_only() -> None:
    """One process (no workers): ready below its limit, not ready at it, with the figures and the key named."""
    assert listener_problem({0: (9, 10)}) is None
    problem = listener_problem({0: (10, 10)})
    assert problem is not None
    assert "(10 of 10 connections: listener.max_connections" in problem


def test_workers_are_not_ready_only_when_every_one_is_full() -> None:
    """With workers, one full worker leaves the gateway ready (the kernel spreads new connections, most get in);
    all full, not ready, each worker named."""
    assert listener_problem({1: (2, 2), 2: (1, 2)}) is None
    problem = listener_problem({1: (2, 2), 2: (2, 2)})
    assert problem is not None
    assert "worker 1: 2 of 2, worker 2: 2 of 2" in problem


def test_a_worker_that_does_not_answer_or_has_no_limit_yet_counts_as_having_room() -> None:
    """A sibling that did not answer (being replaced) or a listener not set up yet (limit 0) never makes the gateway
    unready: only a full listener does."""
    assert listener_problem({1: (2, 2), 2: None}) is None
    assert listener_problem({0: (0, 0)}) is None
    assert listener_problem({}) is None
