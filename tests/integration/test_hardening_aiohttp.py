"""The hardening tests (tests/integration/test_hardening.py, every one of them) against aiohttp's server
(`listener.http_server = "aiohttp"`); the module they come from runs them against the default, the
gateway's own (`"own"`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.test_hardening import *  # noqa: F403  the tests themselves, collected here again
from tests.integration.test_hardening import Scene, hardening_scene


@pytest.fixture(scope="module", name="scene")
def aiohttp_scene(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """test_hardening's scene, with aiohttp's server parsing the device's requests."""
    yield from hardening_scene(lab, tmp_path_factory, "aiohttp")
