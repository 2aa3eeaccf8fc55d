"""The order of a run: the files that hold long tests come first, so that xdist's workers end together.

`make test` runs `pytest -n 4 --dist loadfile --no-loadscope-reorder`: each worker takes whole files, in the
order they are collected here. Left to itself, xdist queues the files with the most tests first, so the one
test that holds a Ping for 310 s (a file of one test) started last, on a worker that had nothing left to do
beside it, and the run waited five minutes for it. A test that takes long (tens of seconds on a loaded
machine) says so with `@pytest.mark.slow(seconds=N)`, N a rough figure; each file's marked seconds are
summed, and the files run longest first. The others keep pytest's order behind them (integration, then the
quick unit tests, which fill the workers' last minutes evenly). The first file that uses the AD realm counts as
slow too: it provisions the realm in a fresh checkout (30-130 s), and every other AD file waits for it, so it
starts beside the long files, not after them. docs/testing.md, "Long tests".

And a run that leaves a new file in the repository's root fails, whatever its tests said (tests/root_files.py:
a user's FILE credential cache once appeared there). A test that leaves its process changed for the next test in its
worker (an environment variable, the working directory, the umask, a resource limit) fails, and the process is put
back (tests/process_state.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import leftovers, process_state, schedule
from tests.root_files import new_files, root_files

AD_REALM_SECONDS = 100.0  # provisioning the AD realm (tests/integration/ad_fixtures.py) in a fresh checkout


SLOW_SECONDS = 30.0  # a bare `@pytest.mark.slow`, without its seconds


def slow_seconds(item: pytest.Item) -> float:
    """The seconds `item`'s `slow` mark gives (`slow(seconds=N)`; SLOW_SECONDS for a bare one), 0 without one."""
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("seconds", SLOW_SECONDS))


@pytest.hookimpl(trylast=True)  # after pytest has grouped the items by their fixtures' scopes
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files by the seconds of their slow tests, longest first (the first file using the AD realm with its
    provisioning's seconds added); a stable sort, so each file keeps its own order and the files without a slow
    test keep their collection order."""
    weight: dict[Path, float] = {}
    for item in items:
        weight[item.path] = weight.get(item.path, 0.0) + slow_seconds(item)
    first_ad = next((item.path for item in items if "ad_realm" in getattr(item, "fixturenames", ())), None)
    if first_ad is not None:
        weight[first_ad] += AD_REALM_SECONDS
    items.sort(key=lambda item: -weight[item.path])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> schedule.LongFilesFirst | None:
    """`--dist loadfile` (make test's) schedules with tests/schedule.py's rule: a worker about to run a test that may
    be long is given a quick file to hold behind it, never the head of the queue. Other modes keep xdist's own."""
    if config.getoption("dist", None) != "loadfile":
        return None
    return schedule.LongFilesFirst(config, log)


_ROOT_FILES = pytest.StashKey[set[str]]()
_NEW_ROOT_FILES = pytest.StashKey[list[str]]()


def _checks_the_root(config: pytest.Config) -> bool:
    """The root is checked once per run: by the xdist controller (the workers' runs are parts of its run), or by
    the only process."""
    return not hasattr(config, "workerinput")


_STOPPED = pytest.StashKey[list[leftovers.Leftover]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """What the repository's root holds before any test runs (tests/root_files.py); what killed runs left running
    stopped, and this run marked in the environment its workers, daemons and children inherit (tests/leftovers.py).
    Before xdist's own `pytest_sessionstart` (trylast), which starts the workers."""
    if _checks_the_root(session.config):
        session.config.stash[_ROOT_FILES] = root_files(session.config.rootpath)
        session.config.stash[_STOPPED] = leftovers.stop_all(leftovers.leftovers())
        os.environ[leftovers.MARK] = leftovers.this_run(session.config.rootpath).mark()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run that left a new file in the repository's root fails (tests/root_files.py), whatever its tests said."""
    before = session.config.stash.get(_ROOT_FILES, None)
    if before is None:
        return
    found = new_files(session.config.rootpath, before)
    if found:
        session.config.stash[_NEW_ROOT_FILES] = found
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Names the processes of killed runs this run stopped as it started, and the files a run left in the root, and
    fails it (`pytest_sessionfinish`)."""
    stopped = terminalreporter.config.stash.get(_STOPPED, [])
    if stopped:
        terminalreporter.section("processes of killed runs, stopped as this run started", sep="-", yellow=True)
        for left in stopped:
            terminalreporter.line(f"{left.pid} {left.command} (the run of pid {left.run.pid} in {left.run.checkout})")
    found = terminalreporter.config.stash.get(_NEW_ROOT_FILES, None)
    if found:
        terminalreporter.section("files left in the repository's root", sep="=", red=True)
        for line in found:
            terminalreporter.line(line, red=True)
        terminalreporter.line("the run fails: a test or a gateway it started wrote into its working directory")


@pytest.fixture(autouse=True)
def _process_as_found() -> Iterator[None]:
    """Every test leaves its process as it found it (tests/process_state.py): what it changed and did not put back
    is put back, and the test fails at its teardown, naming each change. Fixtures of a wider scope (the lab's
    KRB5_CONFIG) are set up before this snapshot and torn down after this comparison, and the tiers' own
    KRB5_CONFIG fixtures (a Delegator's overlay, by design) put it back before it."""
    before = process_state.snapshot()
    yield
    left = process_state.differences(before, process_state.snapshot())
    if left:
        process_state.restore(before)
        changes = "\n  ".join(left)
        pytest.fail(
            "this test left its process changed for the next test in this worker (put back now); restore what it "
            f"changes (monkeypatch, or try/finally):\n  {changes}",
            pytrace=False,
        )
