"""`listener.event_loop`: which event loop a gateway process runs on (proxy.loop)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy import config
from proxy import loop as event_loop
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write


def _with(value: str) -> str:
    return GOOD.replace("[listener]\n", f"[listener]\nevent_loop = {value}\n", 1)


def test_uvloop_is_the_default_and_asyncio_is_accepted(tmp_path: Path) -> None:
    """No key: uvloop (where the package imports); "asyncio" takes asyncio's own loop."""
    assert config.load(_write(tmp_path, GOOD)).listener.event_loop == "uvloop"
    assert config.load(_write(tmp_path, _with('"asyncio"'))).listener.event_loop == "asyncio"


@pytest.mark.parametrize("value", ['"trio"', '"UVLOOP"', "1", "true"])
def test_a_bad_value_names_the_key(tmp_path: Path, value: str) -> None:
    """Anything but "asyncio" or "uvloop" stops the start with a problem naming listener.event_loop."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with(value)))
    assert [p for p in e.value.problems if p.startswith("listener.event_loop")], e.value.problems


def test_uvloop_where_it_does_not_import_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for uvloop on a machine without it is a configuration error, not a crash at start."""
    monkeypatch.setattr(event_loop, "uvloop_missing", lambda: "No module named 'uvloop'")
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with('"uvloop"')))
    assert any(p.startswith("listener.event_loop") and "uvloop" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(("kind", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_run_uses_the_configured_loop(kind: config.EventLoop, module: str) -> None:
    """proxy.loop.run runs the coroutine on a loop of the configured kind, and returns its result."""

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert event_loop.run(which(), kind).split(".")[0] == module
