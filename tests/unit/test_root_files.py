"""The suite's own check (tests/root_files.py, hooked in tests/conftest.py): a run that leaves a file in the
repository's root fails, and says when the file is a FILE credential cache. Each test runs an inner pytest session
with the suite's hooks in a directory of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

_REPOSITORY = Path(__file__).resolve().parents[2]
_HOOKS = "from tests.conftest import pytest_sessionfinish, pytest_sessionstart, pytest_terminal_summary\n"


@pytest.fixture(autouse=True)
def _tests_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(_REPOSITORY))  # the inner session imports the hooks from tests.conftest


def test_a_ccache_left_in_the_root_under_a_binary_name_fails_the_run(pytester: pytest.Pytester) -> None:
    """A passing test that writes a FILE ccache (magic 05 04) under a 6-byte binary name into the root makes the
    run fail (exit 1), and the report names it as a credential cache."""
    pytester.makeconftest(_HOOKS)
    pytester.makepyfile(
        test_writes="""
import os

def test_writes():
    with open(os.path.join(os.fsencode(os.getcwd()), b"\\xc0\\x81f\\xa7\\xd6\\x7f"), "wb") as f:
        f.write(b"\\x05\\x04" + bytes(64))
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*files left in the repository's root*", "*66 bytes, a FILE credential cache*"])


def test_a_run_that_writes_nothing_in_the_root_passes(pytester: pytest.Pytester) -> None:
    """The same session whose test writes its file under tmp_path passes: the check does not fail clean runs."""
    pytester.makeconftest(_HOOKS)
    pytester.makepyfile(
        test_writes="""
def test_writes(tmp_path):
    (tmp_path / "cc").write_bytes(b"\\x05\\x04")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
