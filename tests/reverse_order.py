"""An opt-in pytest plugin that runs the collected tests in reverse order (`pytest -p tests.reverse_order`).

A test that passes only after another one ran (or only before) fails this way: see docs/testing.md.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Reverse the order: within each file, and the files themselves."""
    items.reverse()
