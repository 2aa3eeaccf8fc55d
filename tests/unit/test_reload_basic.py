"""A reload that rebuilds Basic sign-in (its settings changed) keeps the users' and addresses' counts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.auth import basic
from proxy.config import Config
from proxy.live import _carry_over
from tests.unit.test_basic_throttle import FakeKdc, outcome
from tests.unit.test_config import GOOD
from tests.unit.test_config_directory import _load
from tests.unit.test_reload_directory import _gateway

BASIC = """
[authentication]
mode = "basic"
basic_cache_seconds = 0
basic_failures_per_user = {limit}
basic_realm = "{realm}"
"""


def _config(tmp_path: Path, limit: int, realm: str) -> Config:
    return _load(tmp_path, GOOD + BASIC.format(limit=limit, realm=realm))


@pytest.mark.parametrize(("limit", "realm"), [(2, "Mail"), (3, "Mail")], ids=["realm-changed", "limit-raised"])
def test_a_reload_that_changes_authentication_keeps_a_held_user_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, realm: str
) -> None:
    """alice held after two wrong passwords (limit 2), then a reload changes [authentication] (the challenge's
    realm, or the limit raised to 3): her guesser is still refused 429 without the KDC, not given a fresh allowance
    of guesses towards the directory's lockout, and her own password, the one the KDC last accepted, still gets in."""
    kdc = FakeKdc()
    monkeypatch.setattr(basic, "login_blocking", kdc)

    async def run() -> None:
        old = _gateway(_config(tmp_path, 2, "Exchange"), None)
        assert await outcome(old.basic, "alice", "alice-Pa55") == "alice@LAB.TEST"
        assert [await outcome(old.basic, "alice", f"guess{i}", "198.51.100.7") for i in range(2)] == [401, 401]
        new = _carry_over(_gateway(_config(tmp_path, limit, realm), None), old)
        assert new.basic is not old.basic  # rebuilt: its settings changed
        asked = len(kdc.asked)
        assert await outcome(new.basic, "alice", "guess9", "198.51.100.8") == 429
        assert len(kdc.asked) == asked
        assert await outcome(new.basic, "alice", "alice-Pa55") == "alice@LAB.TEST"
        assert new.basic.challenge == {"WWW-Authenticate": f'Basic realm="{realm}"'}

    asyncio.run(run())
