"""`kerberos.ticket_recheck_seconds`: off by default (a ticket serves its life), an age when set, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write


def _with(tmp_path: Path, setting: str) -> config.Config:
    return config.load(_write(tmp_path, GOOD.replace("[kerberos]\n", f"[kerberos]\n{setting}\n")))


def test_the_recheck_is_off_by_default_and_takes_seconds(tmp_path: Path) -> None:
    """0 without the key (two KDC exchanges per user per ticket lifetime); 0 and any positive age when set."""
    assert config.load(_write(tmp_path, GOOD)).kerberos.ticket_recheck_seconds == 0
    assert _with(tmp_path, "ticket_recheck_seconds = 0").kerberos.ticket_recheck_seconds == 0
    assert _with(tmp_path, "ticket_recheck_seconds = 300").kerberos.ticket_recheck_seconds == 300.0
    assert _with(tmp_path, "ticket_recheck_seconds = 2.5").kerberos.ticket_recheck_seconds == 2.5


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("ticket_recheck_seconds = -1", "kerberos.ticket_recheck_seconds: 0 (a cached ticket serves its whole life)"),
        ('ticket_recheck_seconds = "5m"', "kerberos.ticket_recheck_seconds: expected float"),
        ("ticket_recheck_seconds = true", "kerberos.ticket_recheck_seconds: expected float"),
    ],
)
def test_a_bad_recheck_names_its_key(tmp_path: Path, setting: str, problem: str) -> None:
    """A negative or non-numeric age is refused with the key named."""
    with pytest.raises(ConfigError) as e:
        _with(tmp_path, setting)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
