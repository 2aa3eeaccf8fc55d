"""The run's order (tests/conftest.py): files with long tests first, longest first, the rest as collected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests import conftest, schedule


@dataclass
class _Item:
    """What the ordering reads of a collected test: its file and its `slow` mark."""

    name: str
    path: Path
    seconds: float | None = None  # None: no slow mark; 0: a bare one
    fixturenames: tuple[str, ...] = ()

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        if name != "slow" or self.seconds is None:
            return None
        return pytest.mark.slow(seconds=self.seconds).mark if self.seconds else pytest.mark.slow.mark


def _ordered(items: list[_Item]) -> list[str]:
    conftest.pytest_collection_modifyitems(cast(list[pytest.Item], items))
    return [item.name for item in items]


def test_files_with_slow_tests_come_first_longest_first_and_the_rest_keep_their_order() -> None:
    """A file of one 310 s test goes before a file whose two slow tests sum to 40 s; the files without a slow test
    follow in collection order, and each file's tests keep their own order."""
    a, b, c, d = (Path(f"tests/integration/test_{n}.py") for n in "abcd")
    items = [
        _Item("a1", a),
        _Item("a2", a),
        _Item("b1", b, 20),
        _Item("b2", b),
        _Item("b3", b, 20),
        _Item("c1", c),
        _Item("d1", d, 310),
    ]
    assert _ordered(items) == ["d1", "b1", "b2", "b3", "a1", "a2", "c1"]


def test_a_run_without_slow_tests_keeps_the_collection_order() -> None:
    """No `slow` mark: nothing moves."""
    items = [_Item(f"t{i}", Path(f"tests/unit/test_{i % 3}.py")) for i in range(6)]
    assert _ordered(items) == [f"t{i}" for i in range(6)]


def test_the_first_file_using_the_ad_realm_starts_beside_the_long_files() -> None:
    """The first file whose tests use `ad_realm` (they provision it in a fresh checkout; the other AD files wait
    for it) counts its provisioning's seconds: it goes before a file of 85 s, after one of 310 s; the later AD
    files do not move."""
    ad = ("ad_realm", "tmp_path")
    items = [
        _Item("ad1", Path("tests/integration/test_ad.py"), fixturenames=ad),
        _Item("ad2", Path("tests/integration/test_ad_more.py"), fixturenames=ad),
        _Item("bench", Path("tests/integration/test_bench.py"), 85),
        _Item("plain", Path("tests/integration/test_plain.py")),
        _Item("ping", Path("tests/integration/test_ping.py"), 310),
    ]
    assert conftest.AD_REALM_SECONDS > 85
    assert _ordered(items) == ["ping", "ad1", "bench", "ad2", "plain"]


def test_a_bare_slow_mark_counts_as_some_seconds() -> None:
    """`@pytest.mark.slow` without seconds (as marks were written before) is not an error: it counts as
    SLOW_SECONDS, so its file goes before the unmarked ones and after a longer marked one."""
    items = [
        _Item("plain", Path("tests/integration/test_plain.py")),
        _Item("bare", Path("tests/integration/test_bare.py"), 0),
        _Item("long", Path("tests/integration/test_long.py"), 310),
    ]
    assert _ordered(items) == ["long", "bare", "plain"]


class _Config:
    """What xdist's file scheduling reads of pytest's configuration: three workers, the collection's order kept."""

    class option:  # pytest's own attribute name
        loadscopereorder = False

    def getvalue(self, name: str) -> list[str]:
        assert name == "tx"
        return ["3*popen"]


class _Worker:
    """A worker as the scheduler sees it: the tests it was given, in order, and whether it was told to stop."""

    def __init__(self, name: str, collection: list[str]) -> None:
        self.name, self.collection = name, collection
        self.gateway = SimpleNamespace(id=name)
        self.given: list[str] = []
        self.done = 0
        self.shutting_down = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.given += [self.collection[i] for i in indices]

    def shutdown(self) -> None:
        self.shutting_down = True


# The run's head as tests/conftest.py orders it: a file of one 310 s test, two long files, the file provisioning the
# AD realm, then quick files, the unit tests last.
_COLLECTION = [
    "ping.py::t",
    *(f"descriptors.py::t{i}" for i in range(3)),
    *(f"compose.py::t{i}" for i in range(13)),
    *(f"ad.py::t{i}" for i in range(5)),
    "bench.py::t",
    *(f"unit_{n}.py::t{i}" for n in "abc" for i in range(3)),
]


def _started(scheduler_class: type) -> tuple[Any, list[_Worker]]:
    scheduler = scheduler_class(_Config())
    workers = [_Worker(f"gw{i}", list(_COLLECTION)) for i in range(3)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, worker.collection)
    scheduler.schedule()
    return scheduler, workers


def test_the_file_behind_a_one_test_file_is_a_quick_one() -> None:
    """The worker given the 310 s Ping (a file of one test, which it runs only once it knows its next test) is given
    the queue's last file to hold behind it, a quick one; the AD realm's file goes to the next worker that runs out.
    xdist's own file scheduling put the AD file behind the Ping, where it waited 310 s."""
    from xdist.scheduler import LoadFileScheduling  # type: ignore[import-untyped]

    _, workers = _started(LoadFileScheduling)
    assert workers[0].given == ["ping.py::t", *(f"ad.py::t{i}" for i in range(5))]  # the defect, in xdist's own
    _, workers = _started(schedule.LongFilesFirst)
    assert workers[0].given == ["ping.py::t", "unit_c.py::t0", "unit_c.py::t1", "unit_c.py::t2"]
    assert [w.given[0] for w in workers[1:]] == ["descriptors.py::t0", "compose.py::t0"]
    assert all(not name.startswith("ad.py") for w in workers for name in w.given)


def _can_run(worker: _Worker) -> bool:
    """A worker runs its next test once it knows the one after it, or once it was told to stop."""
    left = len(worker.given) - worker.done
    return left >= 2 or (left == 1 and worker.shutting_down)


def test_every_test_is_given_once_and_whole_files_stay_together() -> None:
    """Run to the end (the Ping's worker ending its test only after 20 tests ended elsewhere): every test is given to
    exactly one worker, once, each file whole to one worker in its own order, and the AD file not behind the Ping."""
    scheduler, workers = _started(schedule.LongFilesFirst)
    completions = 0
    while runnable := [w for w in workers if _can_run(w)]:
        others = [w for w in runnable if w is not workers[0]]
        worker = others[completions % len(others)] if others and completions < 20 else runnable[0]
        scheduler.mark_test_complete(worker, worker.collection.index(worker.given[worker.done]))
        worker.done += 1
        completions += 1
    given = [name for w in workers for name in w.given]
    assert sorted(given) == sorted(_COLLECTION)
    assert all(w.done == len(w.given) for w in workers)
    for worker in workers:
        files = [name.partition("::")[0] for name in worker.given]
        assert [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f] == list(dict.fromkeys(files))  # whole
        for f in set(files):
            assert [n for n in worker.given if n.startswith(f + "::")] == [
                n for n in _COLLECTION if n.startswith(f + "::")
            ]
    assert "ad.py::t0" not in workers[0].given


def test_the_files_driving_a_container_engine_go_to_one_worker_one_after_the_other() -> None:
    """test_compose.py, test_compose_ad.py and test_podman.py are one unit of the queue: all their tests go to one
    worker, each file whole and in its order, wherever conftest's order put them; another file is not split."""
    names = [f"tests/integration/{n}.py" for n in ("test_compose", "test_podman", "test_other", "test_compose_ad")]
    collection = [f"{name}::t{i}" for name in names for i in range(3)]
    scheduler = schedule.LongFilesFirst(_Config())
    workers = [_Worker(f"gw{i}", list(collection)) for i in range(3)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, worker.collection)
    scheduler.schedule()
    engines = [name for name in collection if name.partition("::")[0] in schedule.ONE_ENGINE_AT_A_TIME]
    holders = [w for w in workers if any(name in w.given for name in engines)]
    assert len(holders) == 1, [w.given for w in workers]
    assert [name for name in holders[0].given if name in engines] == engines
