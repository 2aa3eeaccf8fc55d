"""/readyz's listener part (`proxy.admin.listener_problem`): not ready only while no worker's device listener is known
to have room."""

from __future__ import annotations

from proxy.admin import listener_problem, workers_problem
from proxy.workers import Serving


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


def test_a_listener_not_set_up_yet_counts_as_having_room() -> None:
    """A listener not set up yet (limit 0) never makes the gateway unready: only a full listener does."""
    assert listener_problem({0: (0, 0)}) is None
    assert listener_problem({1: (2, 2), 2: (0, 0)}) is None
    assert listener_problem({}) is None


def test_a_worker_that_does_not_answer_is_no_room() -> None:
    """A full worker beside siblings that did not answer (hung: the kernel still gives its socket new connections,
    which wait in its backlog; being replaced: it has no socket, and every new connection goes to the full one) is
    not ready, the silent ones named; one sibling with room beside a silent one is. Before, a sibling that did not
    answer was taken as having room: the full gateway said 200."""
    problem = listener_problem({1: (2, 2), 2: None, 3: None})
    assert problem is not None
    assert "(worker 1: 2 of 2 connections: listener.max_connections, " in problem
    assert "holds fewer; worker 2, worker 3 did not answer): new devices wait" in problem
    assert listener_problem({1: (2, 2), 2: None, 3: None}) == problem
    assert listener_problem({1: (2, 2), 2: None, 3: (1, 2)}) is None


def test_workers_short_of_the_configured_are_named_and_all_serving_says_nothing() -> None:
    """/readyz's `workers` (`proxy.admin.workers_problem`): "N of M workers serve" naming the ones that do not, while
    fewer serve than were started; nothing when all do, or when the supervisor's count is unread."""
    assert workers_problem(Serving(2, (1, 2))) is None
    assert workers_problem(None) is None
    problem = workers_problem(Serving(3, (2,)))
    assert problem is not None
    assert problem.startswith("1 of 3 workers serve (worker 1, worker 3 not:"), problem
    assert "worker_not_replaced" in problem


def test_a_stopped_or_stopping_worker_is_named_as_such() -> None:
    """/readyz's `workers` names a stopped worker (whose socket still takes connections, which wait: so not "the others
    take every new connection") and a stopping one, apart from one being replaced."""
    problem = workers_problem(Serving(3, (1,), stopped=(2,)))
    assert problem is not None
    assert problem.startswith("1 of 3 workers serve (worker 2 stopped (SIGSTOP?): "), problem
    assert "worker 3 not: being replaced" in problem
    assert "the others take every new connection" not in problem
    problem = workers_problem(Serving(2, (2,), stopping=(1,)))
    assert problem is not None
    assert problem.startswith("1 of 2 workers serve (worker 1 stopping: its listener closed"), problem
    assert "not: being replaced" not in problem
    assert problem.endswith("; the others take every new connection"), problem
