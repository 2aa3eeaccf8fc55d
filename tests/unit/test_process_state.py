"""The suite's own check (tests/process_state.py, hooked in tests/conftest.py): a test that leaves its process changed
for the next test in its worker fails, naming the change, and the next test finds the process as it was. Each test
runs an inner pytest session with the suite's fixture in a directory of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

_REPOSITORY = Path(__file__).resolve().parents[2]
_FIXTURE = "from tests.conftest import _process_as_found\n"


@pytest.fixture(autouse=True)
def _tests_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(_REPOSITORY))  # the inner session imports the fixture from tests.conftest


def test_a_variable_left_set_fails_its_test_and_is_gone_for_the_next(pytester: pytest.Pytester) -> None:
    """A test that sets an environment variable and passes errors at its teardown, naming the variable and its
    value; the next test in the same process does not see it."""
    pytester.makeconftest(_FIXTURE)
    pytester.makepyfile(
        test_order="""
import os

def test_leaves():
    os.environ["KCD_LEFT_BEHIND"] = "/tmp/relay-krb5.conf"

def test_next():
    assert "KCD_LEFT_BEHIND" not in os.environ
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_leaves*", "*os.environ?'KCD_LEFT_BEHIND'?: unset, now '/tmp/relay-krb5.conf'"]
    )


def test_a_lowered_limit_and_a_new_directory_are_put_back(pytester: pytest.Pytester) -> None:
    """A test that lowers the soft open-file limit and changes directory fails naming both; the next test has the
    limit and the working directory of before."""
    pytester.makeconftest(_FIXTURE)
    pytester.makepyfile(
        test_order="""
import os, resource

FOUND = (resource.getrlimit(resource.RLIMIT_NOFILE), os.getcwd())

def test_leaves(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    os.chdir(tmp_path)

def test_next():
    assert (resource.getrlimit(resource.RLIMIT_NOFILE), os.getcwd()) == FOUND
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the working directory:*", "*resource.RLIMIT_NOFILE (soft, hard): *, now (256, *"])


def test_what_monkeypatch_or_a_wider_fixture_undoes_is_no_failure(pytester: pytest.Pytester) -> None:
    """Changes undone by monkeypatch, and a module fixture's variable (set before the test, removed after the
    module), fail nothing: the check never fires on a test that restores what it changes."""
    pytester.makeconftest(_FIXTURE)
    pytester.makepyfile(
        test_order="""
import os
import pytest

@pytest.fixture(scope="module")
def realm():
    os.environ["KCD_MODULE_REALM"] = "set for the module"
    yield
    del os.environ["KCD_MODULE_REALM"]

def test_monkeypatched(monkeypatch, tmp_path):
    monkeypatch.setenv("KCD_TEST_ONLY", "1")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.chdir(tmp_path)

def test_in_the_realm(realm):
    assert os.environ["KCD_MODULE_REALM"]

def test_after_the_realm(realm):
    assert os.environ["KCD_MODULE_REALM"]
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_a_replaced_excepthook_and_root_level_are_put_back(pytester: pytest.Pytester) -> None:
    """A test that replaces threading.excepthook (pytest's own, installed once per run) and lowers the root logger's
    level, as the gateway's logging set-up does, errors naming both; the next test has pytest's hook and the level
    of before, so a thread of it dying of an exception is reported by pytest again."""
    pytester.makeconftest(_FIXTURE)
    pytester.makepyfile(
        test_order="""
import logging, threading

FOUND = (threading.excepthook, logging.getLogger().level)

def test_leaves():
    threading.excepthook = lambda args: None
    logging.getLogger().setLevel(logging.DEBUG)

def test_next():
    assert (threading.excepthook, logging.getLogger().level) == FOUND
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*threading.excepthook: *, now <function test_leaves.<locals>.<lambda>*", "*DEBUG"])
