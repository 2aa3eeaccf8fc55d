"""`listener.drain_timeout`: its default, 0, its bad values named, and a reload that changes it saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.live import _needs_restart
from tests.unit.test_config import GOOD, _write


def _with(tmp_path: Path, setting: str) -> config.Config:
    return config.load(_write(tmp_path, GOOD.replace("[listener]\n", f"[listener]\n{setting}\n")))


def test_a_stop_drains_20_seconds_by_default_and_0_cuts_at_once(tmp_path: Path) -> None:
    """20 s without the key (below systemd's and Kubernetes' 30 s); 0 and any positive number of seconds when set."""
    assert config.load(_write(tmp_path, GOOD)).listener.drain_timeout == 20.0
    assert _with(tmp_path, "drain_timeout = 0").listener.drain_timeout == 0.0
    assert _with(tmp_path, "drain_timeout = 2.5").listener.drain_timeout == 2.5


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("drain_timeout = -1", "listener.drain_timeout: 0 (requests in flight are cut at once) or a positive number"),
        ('drain_timeout = "20s"', "listener.drain_timeout: expected float"),
        ("drain_timeout = inf", "listener.drain_timeout: expected a finite number"),
    ],
)
def test_a_bad_drain_timeout_names_its_key(tmp_path: Path, setting: str, problem: str) -> None:
    """A negative, non-numeric or infinite drain is refused with the key named."""
    with pytest.raises(ConfigError) as e:
        _with(tmp_path, setting)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_reload_that_changes_the_drain_timeout_says_it_needs_a_restart(tmp_path: Path) -> None:
    """The drain's bound is read at start (aiohttp's runner takes it then): a reload changing it is named."""
    before = config.load(_write(tmp_path, GOOD))
    after = _with(tmp_path, "drain_timeout = 5")
    assert _needs_restart(before, after) == ["listener.drain_timeout"]
