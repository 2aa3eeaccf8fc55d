"""The header-block budget and connection cap tests (tests/integration/test_listener_limits.py) against
aiohttp's server (`listener.http_server = "aiohttp"`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration import test_listener_limits
from tests.integration.conftest import Gateway
from tests.integration.test_listener_limits import *  # noqa: F403  the tests themselves, collected here again

AIOHTTP = 'http_server = "aiohttp"\n'
_own_gateway = test_listener_limits.gateway


def aiohttp_gateway(lab: LabLayout, directory: Path, listener: str = "", admin_port: int | None = None) -> Gateway:
    """test_listener_limits' gateway, with aiohttp's server parsing the device's requests."""
    gw = _own_gateway(lab, directory, AIOHTTP + listener, admin_port)
    gw.wait_for("listening", lambda e: e.get("http_server") == "aiohttp", what="aiohttp's server")
    return gw


@pytest.fixture(autouse=True)
def _aiohttp_gateways(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests that start a gateway of their own (they call their module's `gateway`) start this one."""
    monkeypatch.setattr(test_listener_limits, "gateway", aiohttp_gateway)


@pytest.fixture(scope="module", name="basic_gw")
def aiohttp_basic_gw(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = aiohttp_gateway(lab, tmp_path_factory.mktemp("limits-aiohttp"))
    yield gw
    gw.stop()
