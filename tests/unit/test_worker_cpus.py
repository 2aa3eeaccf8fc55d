"""`[listener] worker_cpus`: read as "auto" or a list of CPUs, each worker's CPU in turn, and CPUs the gateway may
not use named with the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.workers import worker_cpus, worker_cpus_problem
from tests.unit.test_config import GOOD, _write

BIND = 'bind = "127.0.0.1:8443"\n'


def _with(value: str) -> str:
    assert BIND in GOOD
    return GOOD.replace(BIND, f"{BIND}workers = 2\nworker_cpus = {value}\n", 1)


def test_workers_are_not_pinned_without_the_key(tmp_path: Path) -> None:
    """Absent, the setting is None and no worker has a CPU."""
    cfg = config.load(_write(tmp_path, GOOD))
    assert cfg.listener.worker_cpus is None
    assert worker_cpus(cfg.listener.worker_cpus, {0, 1}) == ()


@pytest.mark.parametrize(("value", "loaded"), [('"auto"', "auto"), ("[1, 0]", (1, 0)), ("[3]", (3,))])
def test_auto_and_a_list_of_cpus_are_read(tmp_path: Path, value: str, loaded: object) -> None:
    """ "auto" stays "auto" (resolved when the gateway starts); a list is read in its order."""
    assert config.load(_write(tmp_path, _with(value))).listener.worker_cpus == loaded


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"all"', 'listener.worker_cpus: expected "auto" or a list of CPU numbers'),
        ("[]", 'listener.worker_cpus: expected "auto" or a list of CPU numbers'),
        ("1", 'listener.worker_cpus: expected "auto" or a list of CPU numbers'),
        (
            "[0, -1]",
            'listener.worker_cpus: expected "auto" or a list of CPU numbers such as [0, 1] (leave it out for '
            "no pinning); CPU numbers count from 0",
        ),
        ('["0", "1"]', "listener.worker_cpus: expected"),
        ("[true]", "listener.worker_cpus: expected"),
        ("[0, 1, 0]", "listener.worker_cpus: CPU 0 listed twice"),
    ],
)
def test_a_bad_value_names_the_key(tmp_path: Path, value: str, problem: str) -> None:
    """A word other than "auto", an empty list, a number alone, a negative, a string or a bool, a CPU twice: refused."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with(value)))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_auto_is_the_allowed_cpus_in_order() -> None:
    """ "auto" pins the workers in turn to the CPUs the process may use, in order (a cpuset's numbering kept)."""
    assert worker_cpus("auto", {5, 2, 3}) == (2, 3, 5)
    assert worker_cpus((1, 0), {0, 1}) == (1, 0)


def test_cpus_the_process_may_not_use_are_named_with_the_allowed_ones() -> None:
    """A listed CPU outside the allowed set is a problem naming the key, the CPU, the set and the fix; "auto" is not."""
    problem = worker_cpus_problem((0, 2, 7), {0, 1, 2, 4})
    assert problem is not None
    assert problem.startswith("listener.worker_cpus: CPU 7 not among the CPUs this process may use (0-2,4:")
    assert 'write "auto"' in problem
    assert worker_cpus_problem((1, 0), {0, 1}) is None
    assert worker_cpus_problem("auto", {3}) is None
    assert worker_cpus_problem(None, {0}) is None
