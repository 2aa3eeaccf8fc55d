"""`listener.http_server`: which server parses the devices' requests (proxy.device.server or aiohttp's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write


def _with(value: str) -> str:
    return GOOD.replace("[listener]\n", f"[listener]\nhttp_server = {value}\n", 1)


def test_own_is_the_default_and_aiohttp_is_accepted(tmp_path: Path) -> None:
    """No key: the gateway's own server; "aiohttp" selects aiohttp's web server."""
    assert config.load(_write(tmp_path, GOOD)).listener.http_server == "own"
    assert config.load(_write(tmp_path, _with('"aiohttp"'))).listener.http_server == "aiohttp"


@pytest.mark.parametrize("value", ['"nginx"', '"AIOHTTP"', "1", "true"])
def test_a_bad_value_names_the_key(tmp_path: Path, value: str) -> None:
    """Anything but "own" or "aiohttp" stops the start with a problem naming listener.http_server."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with(value)))
    assert [p for p in e.value.problems if p.startswith("listener.http_server")], e.value.problems
