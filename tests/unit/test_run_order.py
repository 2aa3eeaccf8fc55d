"""The run's order (tests/conftest.py): files with long tests first, longest first, the rest as collected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests import conftest


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
