"""The Delegator's ticket cache is keyed by the name the KDC is asked for, never by a principal two UPNs share.

The KDC exchange is replaced by a recorded answer (which account each NT-ENTERPRISE name is, as Samba's KDC
answered in `tests/integration/test_ad_mapping.py`), so the keying is pinned without a realm; the same scene
against the real AD DC is `test_two_upns_one_principal_apart_never_share_a_ticket`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import cast

import gssapi
import pytest

from proxy.config import Kerberos
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.kerberos import delegate
from proxy.kerberos.delegate import Delegator, _Ticket
from proxy.kerberos.pac import PacFacts

REALM_MAP = {"corp.example": "AD.TEST"}
MALLORY = dataclasses.replace(map_upn("alice@corp.example", realm_map=REALM_MAP), enterprise="alice@corp.example")
ALICE = dataclasses.replace(map_upn("alice@ad.test", realm_map=REALM_MAP), enterprise="alice@ad.test")
ACCOUNTS = {  # NT-ENTERPRISE name -> (the evidence ticket's client, its PAC's UPN, sAMAccountName)
    "alice@corp.example": ("alice\\@corp.example@AD.TEST", "alice@corp.example", "mallory"),
    "alice@ad.test": ("alice\\@ad.test@AD.TEST", "alice@ad.test", "alice"),
}
SPN, TARGET = "HTTP/cas.ad.test", "HTTP@cas.ad.test"


@pytest.fixture
def delegator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Delegator:
    """A Delegator whose KDC exchange answers from ACCOUNTS (no KDC, no keytab read)."""

    def exchange(self: Delegator, user: UserPrincipal, gss_target: str) -> _Ticket:
        assert user.enterprise is not None
        client, upn, sam = ACCOUNTS[user.enterprise]
        pac = PacFacts(500, (("upn-dns-info", 80),), upn, "ad.test", sam, "S-1-5-21-1-2-3-1104")
        return _Ticket(
            creds=cast(gssapi.Credentials, object()), expires=10_000.0, client=client, pac=pac, evidence_client=client
        )

    monkeypatch.setattr(Delegator, "_exchange_blocking", exchange)
    settings = Kerberos(principal="HTTP/proxy.ad.test@AD.TEST", keytab=tmp_path / "none.keytab")
    return Delegator(settings, clock=lambda: 0.0)


def test_two_upns_mapped_to_one_principal_are_two_entries(delegator: Delegator) -> None:
    """mallory's alice@corp.example and alice's alice@ad.test are both alice@AD.TEST, but two NT-ENTERPRISE names
    and two accounts: each gets their own exchange and is served as their own account, in either order."""
    assert MALLORY.principal == ALICE.principal == "alice@AD.TEST"

    async def run() -> list[str]:
        names = []
        for user in (MALLORY, ALICE, MALLORY, ALICE):
            delegation = await delegator.delegation(user, SPN, TARGET)
            names.append(f"{delegation.principal} {delegation.account}")
        return names

    assert asyncio.run(run()) == [
        "alice\\@corp.example@AD.TEST upn alice@corp.example",
        "alice\\@ad.test@AD.TEST upn alice@ad.test",
        "alice\\@corp.example@AD.TEST upn alice@corp.example",
        "alice\\@ad.test@AD.TEST upn alice@ad.test",
    ]
    assert (delegator.stats.exchanges, delegator.stats.hits) == (2, 2)


def test_forgetting_a_revoked_users_enterprise_name_drops_only_their_ticket(delegator: Delegator) -> None:
    """forget(principal, enterprise=...) (a revoked certificate) drops the ticket asked for by that certificate's
    NT-ENTERPRISE name, and leaves the other UPN's ticket of the same principal alone."""

    async def run() -> None:
        await delegator.delegation(MALLORY, SPN, TARGET)
        await delegator.delegation(ALICE, SPN, TARGET)
        assert len(delegator) == 2
        assert delegator.forget(MALLORY.principal, enterprise=MALLORY.enterprise) == 1
        assert len(delegator) == 1
        await delegator.delegation(ALICE, SPN, TARGET)
        assert delegator.stats.exchanges == 2  # alice's ticket was still there

    asyncio.run(run())


def test_the_asked_name_never_equals_a_principal() -> None:
    """An NT-ENTERPRISE name is kept under a mark no principal carries (a backslash)."""
    assert delegate.asked_name(ALICE) != delegate.asked_name(dataclasses.replace(ALICE, enterprise=None))
    assert delegate.asked_name(dataclasses.replace(ALICE, enterprise=None)) == "alice@AD.TEST"


def test_while_one_thread_renews_the_gateways_tgt_the_others_use_the_current_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The gateway's own credentials are due for renewal (100 s left) and the renewal's AS exchange hangs (a KDC
    that accepts and never answers: about 50 s in MIT): another exchange meanwhile gets the current credentials at
    once instead of waiting behind it."""

    class Creds:
        def __init__(self, left: float) -> None:
            self.left = left

    renewing, release = threading.Event(), threading.Event()

    def acquire(**_: object) -> Creds:
        renewing.set()
        assert release.wait(30)
        return Creds(36_000)

    monkeypatch.setattr(delegate, "_remaining", lambda creds: creds.left)
    monkeypatch.setattr("proxy.kerberos.delegate.gssapi.Credentials", acquire)
    settings = Kerberos(principal="HTTP/proxy.ad.test@AD.TEST", keytab=tmp_path / "none.keytab")
    delegator = Delegator(settings)
    current = Creds(100)
    delegator._service = cast(gssapi.Credentials, current)
    renewed: list[object] = []
    renewer = threading.Thread(target=lambda: renewed.append(delegator._service_credentials()))
    renewer.start()
    assert renewing.wait(30)
    got: list[object] = []
    other = threading.Thread(target=lambda: got.append(delegator._service_credentials()))
    other.start()
    other.join(10)
    alive = other.is_alive()
    release.set()
    renewer.join(30)
    other.join(30)
    assert not alive, "an exchange waited for another thread's renewal"
    assert got == [current]
    assert isinstance(renewed[0], Creds)
    assert renewed[0].left == 36_000


def test_a_refused_keytab_raised_from_memory_does_not_grow_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A keytab the KDC refused is refused from memory until the file changes, by raising the one GSSError kept: each
    raise added its frames to that exception's traceback (two a request, each holding its frame and locals), so a
    gateway with a stale keytab grew with every request until the keytab was exported again."""
    import traceback

    class Refused(gssapi.raw.GSSError):
        def gen_message(self) -> str:
            return "Preauthentication failed"

    asked: list[object] = []

    def credentials(**kwargs: object) -> gssapi.Credentials:
        asked.append(kwargs)
        raise Refused(0xD0000, 0)

    monkeypatch.setattr(gssapi, "Credentials", credentials)  # the module delegate calls it through
    keytab = tmp_path / "proxy.keytab"
    keytab.write_bytes(b"\x05\x02")
    delegator = Delegator(Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=keytab))
    try:
        depths = []
        for _ in range(6):
            with pytest.raises(gssapi.raw.GSSError) as refused:
                delegator._acquire_service()
            depths.append(len(traceback.extract_tb(refused.value.__traceback__)))
    finally:
        delegator.close()
    assert len(asked) == 1  # the KDC was asked once; the other five were refused from memory
    assert depths[1:] == [depths[1]] * 5, depths
