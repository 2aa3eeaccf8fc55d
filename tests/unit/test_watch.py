"""The revocation watch over a request in flight, and a request's hold on the gateway it started with.

Both are entered by every request (`proxy.pipeline.handle`, `proxy.app`) and held for as long as a
long-poll lasts, so they are small classes, not generator-based context managers; these tests pin what
they do: a revocation ends a watched request with CertificateRevoked (or cuts it once the answer has
started), any other cancellation stays a cancellation, nothing stays registered afterwards; and a
retired gateway is closed when the last request using it ends, not before.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.certs.chain import TrustList, verify_chain
from proxy.certs.live import LiveRevocation
from proxy.config import ClientCertificates
from proxy.errors import CertificateRevoked
from proxy.lab.pki import Pki, make_pki, revoke
from proxy.live import Live
from tests.pem import load_cert

NOW = datetime.now(UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", now=NOW)


def live_revocation(pki: Pki) -> LiveRevocation:
    cc = ClientCertificates(
        trust_anchors=(pki.root_cert,), intermediates=(pki.issuing_cert,), crls=(pki.crls,), revocation="require"
    )
    revocation = LiveRevocation(cc, TrustList.load([pki.root_cert], [pki.issuing_cert]))
    assert revocation.load(now=NOW) == []
    return revocation


class Request(SimpleNamespace):
    """What the watch reads of a request: whether its answer has started, and how to cut the connection."""

    def __init__(self, *, answer_started: bool = False) -> None:
        aborted: list[bool] = []
        transport = SimpleNamespace(abort=lambda: aborted.append(True))
        super().__init__(
            writer=SimpleNamespace(output_size=int(answer_started)),
            transport=transport,
            answer_started=answer_started,
            abort=transport.abort,
            aborted=aborted,
        )


async def held(
    revocation: LiveRevocation,
    pki: Pki,
    request: Any,
    started: asyncio.Event,
    name: str = "alice",
    forgotten: list[str] | None = None,
) -> str:
    verified = verify_chain(load_cert(pki.user_cert(name)), TrustList.load([pki.root_cert], [pki.issuing_cert]), at=NOW)
    await revocation.check(verified, at=NOW)
    with revocation.watch(request, forget=None if forgotten is None else lambda: forgotten.append(name)):
        assert revocation.in_flight == 1
        started.set()
        await asyncio.sleep(3600)
    return "answered"


def test_a_revocation_ends_a_held_request_with_a_refusal(pki: Pki) -> None:
    """A CRL refresh that lists the certificate ends its held request: CertificateRevoked, nothing left watched, and
    the user's tickets dropped once (`forget`)."""

    async def run() -> None:
        revocation = live_revocation(pki)
        started = asyncio.Event()
        forgotten: list[str] = []
        task = asyncio.create_task(held(revocation, pki, Request(), started, forgotten=forgotten))
        await started.wait()
        assert forgotten == []
        revoke(pki, pki.user_cert("alice"), now=NOW)
        await revocation.crls.refresh()
        with pytest.raises(CertificateRevoked, match="was revoked"):
            await task
        assert revocation.in_flight == 0
        assert forgotten == ["alice"]

    asyncio.run(run())


def test_a_revocation_after_the_answer_started_cuts_the_connection(pki: Pki) -> None:
    """Too late for a 403: the connection is cut and the request stays cancelled."""

    async def run() -> None:
        revocation = live_revocation(pki)
        started = asyncio.Event()
        request = Request(answer_started=True)
        task = asyncio.create_task(held(revocation, pki, request, started))
        await started.wait()
        revoke(pki, pki.user_cert("alice"), now=NOW)
        await revocation.crls.refresh()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert request.aborted == [True]
        assert revocation.in_flight == 0

    asyncio.run(run())


def test_another_cancellation_stays_a_cancellation(pki: Pki) -> None:
    """The device going away (aiohttp cancels the handler) is not turned into a refusal; a refresh that revokes
    someone else leaves the request alone."""

    async def run() -> None:
        revocation = live_revocation(pki)
        started = asyncio.Event()
        request: Any = Request()
        task = asyncio.create_task(held(revocation, pki, request, started))
        await started.wait()
        revoke(pki, pki.user_cert("bob"), now=NOW)
        await revocation.crls.refresh()
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert revocation.in_flight == 0

    asyncio.run(run())


def test_a_request_without_a_checked_certificate_is_not_watched(pki: Pki) -> None:
    """A password-only request (no revocation check in its task) passes through the watch untouched."""

    async def run() -> None:
        revocation = live_revocation(pki)
        request: Any = Request()
        with revocation.watch(request):
            assert revocation.in_flight == 0

        def failing() -> None:
            with revocation.watch(request):
                raise KeyError("the block's own error passes through")

        with pytest.raises(KeyError):
            failing()

    asyncio.run(run())


def test_a_retired_gateway_closes_after_its_last_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests hold the gateway they started with; once reloaded away, it closes when the last of them ends
    (also when that request raised), and not while one is still running."""
    closed: list[object] = []

    async def fake_close(gw: object, *, keep: object) -> None:
        closed.append(gw)

    monkeypatch.setattr("proxy.live._close", fake_close)

    async def run() -> None:
        old: Any = SimpleNamespace(name="old")
        new: Any = SimpleNamespace(name="new")
        live = Live(old, None)  # type: ignore[arg-type]
        first, second = live.use(), live.use()

        def reloaded_meanwhile() -> None:
            with second:
                live.gateway = new
                live._retired[id(old)] = (old, new)
                raise RuntimeError("the request failed")

        with first as gw:
            assert gw is old
            with pytest.raises(RuntimeError):
                reloaded_meanwhile()
            await asyncio.sleep(0)
            assert closed == []  # `first` still runs with it
        await asyncio.sleep(0)
        assert closed == [old]
        with live.use() as gw:
            assert gw is new
        assert live._users == {}

    asyncio.run(run())


def test_watch_and_use_are_small(pki: Pki) -> None:
    """Held for as long as a long-poll lasts: no generator frame, no per-instance dict."""
    revocation = live_revocation(pki)
    live = Live(SimpleNamespace(), None)  # type: ignore[arg-type]
    request: Any = Request()

    async def watched() -> object:
        await revocation.check(verify_chain(load_cert(pki.user_cert("alice")), revocation.crls.trust, at=NOW), at=NOW)
        return revocation.watch(request)

    for manager in (asyncio.run(watched()), live.use()):
        assert not hasattr(manager, "__dict__"), type(manager)
        assert not hasattr(manager, "gen"), type(manager)
    assert dataclasses.is_dataclass(Live)


def test_a_revocation_between_the_check_and_the_watch_refuses_the_request(pki: Pki) -> None:
    """A CRL refresh that lists the certificate while its request is in the identity or Kerberos stages (after
    the revocation check, before the backend stage's watch begins): the request is refused, never forwarded, and
    its user's tickets are dropped (`forget`), as when a held request is ended by the revocation."""

    async def run() -> None:
        revocation = live_revocation(pki)
        verified = verify_chain(
            load_cert(pki.user_cert("alice")), TrustList.load([pki.root_cert], [pki.issuing_cert]), at=NOW
        )
        await revocation.check(verified, at=NOW)
        revoke(pki, pki.user_cert("alice"), now=NOW)
        await revocation.crls.refresh()  # meanwhile: the KDC answers slowly
        forgotten: list[bool] = []
        with (
            pytest.raises(CertificateRevoked, match="was revoked"),
            revocation.watch(Request(), forget=lambda: forgotten.append(True)),
        ):
            pytest.fail("the backend stage ran for a revoked certificate")
        assert revocation.in_flight == 0
        assert forgotten == [True]

    asyncio.run(run())


def test_a_request_between_its_check_and_its_watch_at_a_reload_is_judged_by_the_new_configuration(pki: Pki) -> None:
    """bob's request passed the old stage's revocation check and was in its identity or Kerberos stage (seconds
    with a slow KDC) when a reload handed the old stage over to one whose CRLs revoke bob: its watch began after the
    hand-over, judged by the old CRLs only, and the request was then held for its hour; now the watch refuses it."""

    async def run() -> None:
        old = live_revocation(pki)
        trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
        verified = verify_chain(load_cert(pki.user_cert("bob")), trust, at=NOW)
        await old.check(verified, at=NOW)  # good under the old CRLs
        revoke(pki, pki.user_cert("bob"), now=NOW)
        new = live_revocation(pki)  # the reloaded configuration, whose CRLs list bob
        old.hand_over(new, trust)
        with pytest.raises(CertificateRevoked), old.watch(Request()):
            pass
        assert old.in_flight == 0
        await old.close()
        await new.close()

    asyncio.run(run())
