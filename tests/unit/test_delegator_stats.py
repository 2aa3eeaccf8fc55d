"""The Delegator's counters: an exchange is one a thread was given to, never one refused before the KDC was asked.

The KDC exchange is replaced by one that blocks until released (a KDC that accepts and never answers), so the
refusal for want of a thread (`proxy.kerberos.threads`) is pinned without a realm; the same scene against a real
frozen KDC is `test_kdc_hang_elsewhere.test_exchanges_refused_for_want_of_a_thread_are_refusals_not_kdc_requests`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from proxy.config import Kerberos
from proxy.errors import KdcUnavailable
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.kerberos.delegate import Delegator, _Ticket

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


def test_an_exchange_refused_for_want_of_a_thread_is_not_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """max_in_flight = 1: alice's exchange holds the thread past kdc_timeout (503), bob's is refused at once (503,
    no thread): stats.exchanges is 1 (alice's), failures 2. It was 2: bob's refusal was counted as an exchange."""
    silent = threading.Event()

    def exchange(self: Delegator, user: UserPrincipal, gss_target: str) -> _Ticket:
        silent.wait(30)  # the KDC never answers (released at the end)
        raise AssertionError("not answered")

    monkeypatch.setattr(Delegator, "_exchange_blocking", exchange)
    settings = Kerberos(
        principal="HTTP/proxy.lab.test@LAB.TEST", keytab=tmp_path / "none.keytab", max_in_flight=1, kdc_timeout=0.2
    )
    delegator = Delegator(settings)

    async def run() -> list[str]:
        refusals = []
        for name in ("alice", "bob"):
            with pytest.raises(KdcUnavailable) as refused:
                await delegator.delegation(map_upn(f"{name}@lab.test", realm_map={}), SPN, TARGET)
            refusals.append(refused.value.hint or "")
        return refusals

    try:
        alice, bob = asyncio.run(run())
    finally:
        silent.set()
        delegator.close()
    assert "within 0.2 s" in alice
    assert "threads" in bob
    assert (delegator.stats.exchanges, delegator.stats.failures) == (1, 2)
