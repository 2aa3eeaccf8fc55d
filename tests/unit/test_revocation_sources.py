"""The live CRL store: refresh from files and URLs, never trade a good CRL for a bad one, report each source."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from proxy.auth.shared import CRL_FLOORS, SharedTable
from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.der import inside, whole
from proxy.certs.revocation import MAX_CRL_BYTES, CrlSet, RevocationStatus, accept
from proxy.certs.sources import CrlSource, CrlStore, distribution_point_urls, shown_location
from proxy.errors import CertificateRevoked
from proxy.lab.pki import Pki, make_pki, revoke
from tests.pem import der_tlv, load_cert, load_key

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", now=NOW, crl_base_url="http://127.0.0.1:9/crl")


@pytest.fixture
def trust(pki: Pki) -> TrustList:
    return TrustList.load([pki.root_cert], [pki.issuing_cert])


def verified(pki: Pki, trust: TrustList, name: str) -> VerifiedCertificate:
    return verify_chain(load_cert(pki.user_cert(name)), trust, at=NOW)


def status(store: CrlStore, v: VerifiedCertificate, at: datetime = NOW) -> RevocationStatus:
    return store.current.lookup(v.leaf, v.chain[1], at=at, anchor=v.chain[-1]).status


def forged_crl(pki: Pki, serial: int) -> bytes:
    """A CRL that names the lab's issuing CA and lists `serial`, but is signed with the rogue CA's key."""
    return _crl(pki, pki.rogue_issuing_key, 99, serial)


def _issuing_crl(pki: Pki, number: int, serial: int) -> bytes:
    """A CRL of the lab's issuing CA, signed with its own key, numbered `number`, listing `serial`."""
    return _crl(pki, pki.issuing_key, number, serial)


def _negative_crl(pki: Pki, number: int, serial: int) -> bytes:
    """`_issuing_crl` numbered `number` (-128 to -1), signed by the issuing CA: cryptography builds no such CRL but
    reads one, so a CRL numbered 127 gets its number's one octet set to `number`'s and is signed again."""
    assert -128 <= number < 0
    der = _issuing_crl(pki, 127, serial)
    _tbs, algorithm, _signature = inside(der, whole(der))
    tbs = x509.load_der_x509_crl(der).tbs_certlist_bytes
    numbered = bytes.fromhex("0603551d14") + bytes.fromhex("040302017f")  # cRLNumber, OCTET STRING, INTEGER 127
    assert tbs.count(numbered) == 1
    tbs = tbs.replace(numbered, numbered[:-1] + (number & 0xFF).to_bytes(1, "big"))
    key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = der_tlv(0x03, b"\0" + key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    return der_tlv(0x30, tbs + der[algorithm[1] : algorithm[2]] + signature)


def _crl(pki: Pki, signer: Path, number: int, serial: int) -> bytes:
    """A DER CRL naming the lab's issuing CA, numbered `number`, listing `serial`, signed with the key at `signer`."""
    key = serialization.load_pem_private_key(signer.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _crl_by(pki, key, number, serial)


def _crl_by(
    pki: Pki, key: ec.EllipticCurvePrivateKey, number: int, serial: int, next_update: timedelta = timedelta(days=1)
) -> bytes:
    """`_crl` signed with `key`, its nextUpdate `next_update` after NOW."""
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=1))
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(load_cert(pki.issuing_cert).subject)
        .last_update(NOW - timedelta(minutes=1))
        .next_update(NOW + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_revoked_certificate(entry.build())
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER)


def test_refresh_picks_up_a_revocation_from_a_file(pki: Pki, trust: TrustList) -> None:
    """After revoke() rewrites the CRL file, one refresh makes the certificate revoked; listeners hear of it."""
    asyncio.run(_test_refresh_picks_up_a_revocation_from_a_file(pki, trust))


async def _test_refresh_picks_up_a_revocation_from_a_file(pki: Pki, trust: TrustList) -> None:
    store = CrlStore(trust, [CrlSource(str(pki.crls))])
    assert store.load_files(now=NOW) == []
    bob = verified(pki, trust, "bob")
    assert status(store, bob) is RevocationStatus.GOOD
    changes: list[tuple[CrlSet, CrlSet]] = []
    store.on_change(lambda old, new: changes.append((old, new)))
    await store.refresh(now=NOW)
    assert changes == []  # nothing changed: nobody is told
    revoke(pki, pki.user_cert("bob"), now=NOW)
    await store.refresh(now=NOW)
    assert status(store, bob) is RevocationStatus.REVOKED
    assert len(changes) == 1
    assert changes[0][1] is store.current


def test_a_refresh_that_brings_no_new_crl_keeps_the_set_and_its_index(pki: Pki, trust: TrustList) -> None:
    """A refresh whose sources bring the CRLs held (the same file bytes) keeps the set itself, index and remembered
    answers, where each round indexed every CRL afresh (0.13 s of CPU per 200,000 entries): bob's answer is the one
    remembered. A refresh that brings a new CRL (bob revoked) still makes a new set, and bob is refused at once."""
    asyncio.run(_test_a_refresh_that_brings_no_new_crl_keeps_the_set_and_its_index(pki, trust))


async def _test_a_refresh_that_brings_no_new_crl_keeps_the_set_and_its_index(pki: Pki, trust: TrustList) -> None:
    store = CrlStore(trust, [CrlSource(str(pki.crls))])
    assert store.load_files(now=NOW) == []
    bob = verified(pki, trust, "bob")
    held = store.current
    good = held.check(bob, at=NOW, policy="require")
    for minutes in (1, 2):
        await store.refresh(now=NOW + timedelta(minutes=minutes))
        assert store.current is held
        assert store.current.check(bob, at=NOW, policy="require") is good  # remembered, not looked up again
    revoke(pki, pki.user_cert("bob"), now=NOW)
    await store.refresh(now=NOW + timedelta(minutes=3))
    assert store.current is not held
    with pytest.raises(CertificateRevoked):
        store.current.check(bob, at=NOW, policy="require")


def test_a_kept_set_whose_crl_passed_its_next_update_no_longer_vouches(pki: Pki, trust: TrustList) -> None:
    """A CRL whose nextUpdate passes with no new one behind it (the file unchanged at each refresh): the set kept for
    the same CRLs gives its remembered "good" only until that nextUpdate; a request after it is refused under
    "require" (no current CRL) and carol, whom the CRL of that set lists, is refused as revoked until then. A pin
    (review44): a kept set remembers an answer only for the span in which none of its CRLs changes state."""
    asyncio.run(_test_a_kept_set_whose_crl_passed_its_next_update_no_longer_vouches(pki, trust))


async def _test_a_kept_set_whose_crl_passed_its_next_update_no_longer_vouches(pki: Pki, trust: TrustList) -> None:
    revoke(pki, pki.user_cert("carol"), now=NOW)
    store = CrlStore(trust, [CrlSource(str(pki.crls))])
    assert store.load_files(now=NOW) == []
    bob, carol = verified(pki, trust, "bob"), verified(pki, trust, "carol")
    held = store.current
    assert held.check(bob, at=NOW, policy="require").status is RevocationStatus.GOOD
    ends = min(crl.next_update for crl in held.crls)
    await store.refresh(now=ends - timedelta(seconds=1))
    assert store.current is held
    with pytest.raises(CertificateRevoked, match="revoked"):
        store.current.check(carol, at=ends - timedelta(seconds=1), policy="require")
    assert store.current.check(bob, at=ends, policy="require").status is RevocationStatus.GOOD
    await store.refresh(now=ends + timedelta(seconds=1))
    with pytest.raises(CertificateRevoked, match="no current CRL"):
        store.current.check(bob, at=ends + timedelta(seconds=1), policy="require")


def test_a_set_kept_for_the_same_crls_still_vets_their_signers_at_the_new_time(pki: Pki, trust: TrustList) -> None:
    """`CrlSet.of` with the set it replaces keeps that set only while vetting at the new time keeps its very CRLs:
    once the issuing CA's certificate, which signed its CRL, has expired, the same CRLs make a set without that CRL,
    and the problem is reported."""
    files = (pki.root_crl, pki.issuing_crl)
    crls = [accept(str(path), x509.load_der_x509_crl(path.read_bytes()), trust, at=NOW) for path in files]
    held, problems = CrlSet.of(crls, trust, at=NOW)
    assert problems == []
    assert CrlSet.of(crls, trust, at=NOW + timedelta(minutes=1), previous=held) == (held, [])
    later = load_cert(pki.issuing_cert).not_valid_after_utc + timedelta(days=1)
    after, problems = CrlSet.of(crls, trust, at=later, previous=held)
    assert after is not held
    assert len(after.crls) == len(held.crls) - 1
    assert any("has no valid path" in problem for problem in problems), problems


def test_unparsable_or_forged_crl_never_replaces_a_good_one(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """Garbage, then a CRL signed by the wrong key: the last good CRL stays, and the source reports why."""
    asyncio.run(_test_unparsable_or_forged_crl_never_replaces_a_good_one(pki, trust, tmp_path))


async def _test_unparsable_or_forged_crl_never_replaces_a_good_one(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(path))])
    store.load_files(now=NOW)
    alice = verified(pki, trust, "alice")
    good = store.current.crls
    path.write_bytes(b"<html>proxy error</html>")
    await store.refresh(now=NOW)
    assert store.current.crls == good
    (row,) = store.status(now=NOW)
    assert "not a PEM or DER CRL" in str(row.last_error)
    assert (row.issuer, row.crl_number, row.current) == ("CN=Lab Issuing CA", 1, True)
    path.write_bytes(forged_crl(pki, alice.serial))
    await store.refresh(now=NOW)
    assert status(store, alice) is RevocationStatus.GOOD
    (row,) = store.status(now=NOW)
    assert row.last_error == (
        "CRL signature does not verify against the trusted 'CN=Lab Issuing CA' (signed with another key?)"
    )


def _crl_with_an_unreadable_entry(pki: Pki, signer: Path) -> bytes:
    """A current DER CRL naming the lab's issuing CA, signed with the key at `signer` (ECDSA with SHA-256), whose one
    entry's serial is an OCTET STRING: cryptography refuses to read it, as it refuses a CRL a byte short of its end."""
    key = load_key(signer)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def utc(when: datetime) -> bytes:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())

    algorithm = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    entry = der_tlv(0x30, der_tlv(0x04, b"\x05") + utc(NOW - timedelta(hours=1)))
    times = utc(NOW - timedelta(minutes=1)) + utc(NOW + timedelta(days=1))
    issuer = load_cert(pki.issuing_cert).subject.public_bytes()
    tbs = der_tlv(0x30, der_tlv(0x02, b"\x01") + algorithm + issuer + times + der_tlv(0x30, entry))
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + key.sign(tbs, ec.ECDSA(hashes.SHA256()))))


def test_a_forged_crl_is_refused_for_its_signature_before_its_entries_are_read(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A CRL under the issuing CA's name signed by another key is refused for its signature though cryptography could
    not read its entries: they are never read (`accept_der`). The issuing CA's own such CRL is refused as unreadable.
    Before, every CRL fetched was read whole first: a forged one of 64 MB held the GIL 0.2-0.33 s at each refresh."""
    forged, unreadable = tmp_path / "forged.crl", tmp_path / "unreadable.crl"
    forged.write_bytes(_crl_with_an_unreadable_entry(pki, pki.rogue_issuing_key))
    unreadable.write_bytes(_crl_with_an_unreadable_entry(pki, pki.issuing_key))
    store = CrlStore(trust, [CrlSource(str(forged)), CrlSource(str(unreadable))])
    refused_forged, refused_unreadable = store.load_files(now=NOW)
    assert refused_forged == (
        f"{forged}: CRL signature does not verify against the trusted 'CN=Lab Issuing CA' (signed with another key?)"
    )
    assert refused_unreadable.startswith(f"{unreadable}: {unreadable}: not a PEM or DER CRL (error parsing")


def test_older_crl_is_refused_as_a_replay(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """A CRL with a lower number than the one held (an attacker replaying last week's) is not taken."""
    asyncio.run(_test_older_crl_is_refused_as_a_replay(pki, trust, tmp_path))


async def _test_older_crl_is_refused_as_a_replay(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    old = pki.issuing_crl.read_bytes()
    revoke(pki, pki.user_cert("carol"), now=NOW)
    path.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(path))])
    store.load_files(now=NOW)
    carol = verified(pki, trust, "carol")
    assert status(store, carol) is RevocationStatus.REVOKED
    path.write_bytes(old)
    await store.refresh(now=NOW)
    assert status(store, carol) is RevocationStatus.REVOKED
    assert store.status(now=NOW)[0].last_error == (
        "CRL #1 of 'CN=Lab Issuing CA' is older than the CRL #2 of 'CN=Lab Issuing CA' already held (replayed?)"
    )


@contextlib.asynccontextmanager
async def crl_server(
    answer: Callable[[str], bytes] | None = None,
) -> AsyncIterator[tuple[str, dict[str, bytes], list[str]]]:
    """A real HTTP server: path -> bytes it serves (404 when absent), and the paths asked for. With `answer`, each
    body is made from the path asked instead (a different CRL at each fetch of one path)."""
    served: dict[str, bytes] = {}
    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request.path)
        if answer is not None:
            return web.Response(body=answer(request.path), content_type="application/pkix-crl")
        if request.path not in served:
            raise web.HTTPNotFound
        return web.Response(body=served[request.path], content_type="application/pkix-crl")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", served, asked
    finally:
        await runner.cleanup()


Server = tuple[str, dict[str, bytes], list[str]]


def test_failed_fetch_keeps_the_last_good_crl_until_it_is_stale(pki: Pki, trust: TrustList) -> None:
    """The URL goes away: the CRL fetched before still serves, until its nextUpdate; the error is reported."""
    asyncio.run(_test_failed_fetch_keeps_the_last_good_crl_until_it_is_stale(pki, trust))


async def _test_failed_fetch_keeps_the_last_good_crl_until_it_is_stale(pki: Pki, trust: TrustList) -> None:
    async with crl_server() as server:
        base, served, _ = server
        served["/issuing.crl"] = pki.issuing_crl.read_bytes()
        store = CrlStore(trust, [CrlSource(f"{base}/issuing.crl")])
        await store.refresh(now=NOW)
        alice = verified(pki, trust, "alice")
        assert status(store, alice) is RevocationStatus.GOOD
        del served["/issuing.crl"]
        await store.refresh(now=NOW + timedelta(minutes=1))
        assert status(store, alice, NOW + timedelta(minutes=1)) is RevocationStatus.GOOD
        (row,) = store.status(now=NOW + timedelta(minutes=1))
        assert row.last_error == "fetch failed: ValueError: HTTP 404"
        assert (row.last_fetch, row.last_success) == (NOW + timedelta(minutes=1), NOW)
        assert row.next_update is not None
        stale = row.next_update + timedelta(seconds=1)
        await store.refresh(now=stale)
        assert status(store, alice, stale) is RevocationStatus.UNKNOWN
        assert store.status(now=stale)[0].current is False
        await store.close()


def test_distribution_points_are_learned_once(tmp_path: Path) -> None:
    """With use_distribution_points, the URLs a verified chain names are fetched on first sight, then refreshed."""
    asyncio.run(_test_distribution_points_are_learned_once(tmp_path))


async def _test_distribution_points_are_learned_once(tmp_path: Path) -> None:
    async with crl_server() as server:
        base, served, asked = server
        pki = make_pki(tmp_path / "pki", now=NOW, crl_base_url=base)
        trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
        served["/issuing.crl"] = pki.issuing_crl.read_bytes()
        served["/root.crl"] = pki.root_crl.read_bytes()
        store = CrlStore(trust, [], use_distribution_points=True)
        await store.refresh(now=NOW)
        assert asked == ["/root.crl"]  # the configured intermediate's distribution point, known from the start
        alice = verified(pki, trust, "alice")
        assert status(store, alice) is RevocationStatus.UNKNOWN
        await asyncio.gather(store.learn(alice.chain), store.learn(alice.chain))
        assert asked == ["/root.crl", "/issuing.crl"]  # once, though two requests wanted it at the same time
        assert status(store, alice) is RevocationStatus.GOOD
        await store.learn(alice.chain)
        assert asked == ["/root.crl", "/issuing.crl"]
        assert [(row.source, row.learned) for row in store.status()] == [
            (f"{base}/root.crl", True),
            (f"{base}/issuing.crl", True),
        ]
        await store.close()


def test_refresh_loop_runs_until_stopped(pki: Pki, trust: TrustList) -> None:
    """run() refreshes every refresh_seconds and returns promptly when told to stop."""
    asyncio.run(_test_refresh_loop_runs_until_stopped(pki, trust))


async def _test_refresh_loop_runs_until_stopped(pki: Pki, trust: TrustList) -> None:
    store = CrlStore(trust, [CrlSource(str(pki.crls))], refresh_seconds=0.05)
    store.load_files(now=NOW)
    bob = verified(pki, trust, "bob")
    stop = asyncio.Event()
    task = asyncio.create_task(store.run(stop))
    changed = asyncio.Event()
    store.on_change(lambda _old, _new: changed.set())
    revoke(pki, pki.user_cert("bob"), now=NOW)
    await asyncio.wait_for(changed.wait(), 30)  # a refresh every 0.05 s; a loaded machine may take seconds
    assert status(store, bob) is RevocationStatus.REVOKED
    stop.set()
    await asyncio.wait_for(task, 10)


def test_distribution_point_urls_skip_other_schemes(pki: Pki) -> None:
    """Only http(s) distribution points are fetched (ldap:// ones, common with AD CS, are skipped)."""
    issuing = load_cert(pki.issuing_cert)
    assert distribution_point_urls([load_cert(pki.user_cert("alice")), issuing]) == [
        "http://127.0.0.1:9/crl/issuing.crl",
        "http://127.0.0.1:9/crl/root.crl",
    ]
    assert distribution_point_urls([load_cert(pki.root_cert)]) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_crl_file_turned_fifo_or_huge_fails_its_source_and_keeps_the_good_crl(
    pki: Pki, trust: TrustList, tmp_path: Path, kind: str
) -> None:
    """The CRL file is replaced by a FIFO nobody writes to (the read blocked for good, and every later refresh of
    every source with it) or by a file larger than MAX_CRL_BYTES (read whole into memory): the refresh ends, the
    source reports why, and the last good CRL stays."""
    path = tmp_path / "issuing.crl"
    path.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(path))])
    assert store.load_files(now=NOW) == []
    good = store.current.crls
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with path.open("wb") as f:
            f.truncate(MAX_CRL_BYTES + 1)  # sparse: costs no disk
    asyncio.run(asyncio.wait_for(store.refresh(now=NOW), 20))
    assert store.current.crls == good
    (row,) = store.status(now=NOW)
    problem = "not a regular file" if kind == "fifo" else f"more than {MAX_CRL_BYTES} bytes"
    assert problem in str(row.last_error), row.last_error


def test_a_changed_crl_is_vetted_and_indexed_off_the_event_loop(
    pki: Pki, trust: TrustList, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a CRL's entries, checking it and indexing the set take CPU in proportion to its size (a CRL of
    200,000 entries, 6 MiB: about 2.6 s here), and a refresh did it on the event loop, stalling every request and
    handshake each time the CRL changed: a refresh now does both in a worker thread, and still swaps the set."""
    import threading

    from proxy.certs import revocation

    threads: dict[str, set[int]] = {"accept": set(), "index": set()}
    real_accept, real_of = revocation.accept_der, CrlSet.of

    def accept(*args: Any, **kwargs: Any) -> Any:
        threads["accept"].add(threading.get_ident())
        return real_accept(*args, **kwargs)

    def of(*args: Any, **kwargs: Any) -> Any:
        threads["index"].add(threading.get_ident())
        return real_of(*args, **kwargs)

    monkeypatch.setattr("proxy.certs.sources.accept_der", accept)
    monkeypatch.setattr(CrlSet, "of", of)
    path = tmp_path / "issuing.crl"
    path.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(path))])

    async def run() -> int:
        bob = verified(pki, trust, "bob")
        revoke(pki, pki.user_cert("bob"), now=NOW)
        path.write_bytes(pki.issuing_crl.read_bytes())
        await store.refresh(now=NOW)
        assert status(store, bob) is RevocationStatus.REVOKED
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert threads["accept"]
    assert threads["index"]
    assert loop_thread not in threads["accept"] | threads["index"]


def test_a_replayed_crl_vetted_beside_a_newer_one_never_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fetches of one distribution point at once (a chain's first sight and the periodic refresh), one answered
    with CRL #2 (carol revoked) and one with a replayed CRL #1: each was vetted in a thread against the CRLs held when
    it started, so #1, vetted before #2 was kept and kept after it, replaced it and carol was good again."""
    import threading

    from proxy.certs import sources

    real_vet, real_keep = sources._vet, CrlStore._keep
    answers: list[bytes] = []
    older_vetted, newer_held = threading.Event(), threading.Event()

    def answer(path: str) -> bytes:
        return answers_by_name["root"] if path == "/root.crl" else answers.pop(0)

    def vet(state: Any, data: bytes, trust: TrustList, now: datetime, floors: Any) -> Any:
        if data == answers_by_name["new"]:  # #2 is vetted once #1 has been, against the same CRLs held
            older_vetted.wait(60)
            return real_vet(state, data, trust, now, floors)
        vetted = real_vet(state, data, trust, now, floors)
        if data != answers_by_name["old"]:
            return vetted
        older_vetted.set()
        newer_held.wait(60)  # #1's verdict is kept after #2 was
        return vetted

    def keep(self: CrlStore, state: Any, vetted: Any, now: datetime) -> None:
        real_keep(self, state, vetted, now)
        if state.source.location.endswith("/issuing.crl") and any(crl.number == 2 for crl in state.crls):
            newer_held.set()

    answers_by_name: dict[str, bytes] = {}
    monkeypatch.setattr(sources, "_vet", vet)
    monkeypatch.setattr(CrlStore, "_keep", keep)

    async def run() -> None:
        async with crl_server(answer) as (base, _, asked):
            pki = make_pki(tmp_path / "pki", now=NOW, crl_base_url=base)
            trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
            answers_by_name["old"] = pki.issuing_crl.read_bytes()
            revoke(pki, pki.user_cert("carol"), now=NOW)
            answers_by_name["root"] = pki.root_crl.read_bytes()
            answers_by_name["new"] = pki.issuing_crl.read_bytes()
            answers.extend([answers_by_name["new"], answers_by_name["old"]])  # in the order asked
            store = CrlStore(trust, [], use_distribution_points=True)
            try:
                await store.refresh(now=NOW)  # the root's CRL, named by the configured intermediate
                carol = verified(pki, trust, "carol")
                await asyncio.gather(store.learn(carol.chain), store.refresh(now=NOW))
                assert asked.count("/issuing.crl") == 2
                assert older_vetted.is_set()
                assert newer_held.is_set()
                assert status(store, carol) is RevocationStatus.REVOKED
                row = next(row for row in store.status(now=NOW) if row.source == f"{base}/issuing.crl")
                assert "older than the CRL #2" in str(row.last_error), row.last_error
            finally:
                await store.close()

    asyncio.run(run())


def test_a_crl_bundle_cut_short_never_replaces_the_crls_it_held(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """A PEM bundle of two CRLs cut inside the second (a copy interrupted, a full disk) was read as the first alone:
    the second issuer's CRL was dropped, so its users were refused under `require`, and its revoked users served
    under `best-effort`. A CRL block without its END line makes the read unusable; the last good CRLs stay."""
    asyncio.run(_test_a_crl_bundle_cut_short_never_replaces_the_crls_it_held(pki, trust, tmp_path))


async def _test_a_crl_bundle_cut_short_never_replaces_the_crls_it_held(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    revoke(pki, pki.user_cert("carol"), now=NOW)
    bundle = pki.crls.read_bytes()  # the root's CRL, then the issuing CA's
    assert bundle.count(b"-----BEGIN X509 CRL-----") == 2
    path = tmp_path / "crls.pem"
    path.write_bytes(bundle)
    store = CrlStore(trust, [CrlSource(str(path))])
    store.load_files(now=NOW)
    carol = verified(pki, trust, "carol")
    assert status(store, carol) is RevocationStatus.REVOKED
    good = store.current.crls
    for cut in (len(bundle) - 40, bundle.rindex(b"-----BEGIN X509 CRL-----") + 12):
        path.write_bytes(bundle[:cut])
        await store.refresh(now=NOW)
        assert store.current.crls == good, cut
        assert status(store, carol) is RevocationStatus.REVOKED
        assert "cut short" in str(store.status(now=NOW)[0].last_error)


def test_a_reloaded_store_starts_from_the_crls_its_trust_list_still_vouches_for(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """`inherit` (a reload): a replayed CRL read by the new store is refused against the CRL the old one held; a
    store whose trust list no longer holds that CRL's signer starts from nothing and takes what it reads."""
    asyncio.run(_test_a_reloaded_store_starts_from_the_crls_its_trust_list_still_vouches_for(pki, trust, tmp_path))


async def _test_a_reloaded_store_starts_from_the_crls_its_trust_list_still_vouches_for(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    path = tmp_path / "issuing.crl"
    older = pki.issuing_crl.read_bytes()
    revoke(pki, pki.user_cert("carol"), now=NOW)
    path.write_bytes(pki.issuing_crl.read_bytes())
    old = CrlStore(trust, [CrlSource(str(path))])
    old.load_files(now=NOW)
    carol = verified(pki, trust, "carol")
    path.write_bytes(older)  # carol not yet revoked, still current
    reloaded = CrlStore(trust, [CrlSource(str(path))])
    reloaded.inherit(old)
    reloaded.load_files(now=NOW)
    assert status(reloaded, carol) is RevocationStatus.REVOKED
    assert "replayed?" in str(reloaded.status(now=NOW)[0].last_error)
    root_only = TrustList.load([pki.root_cert])  # the issuing CA's certificate is no longer configured
    elsewhere = CrlStore(root_only, [CrlSource(str(path))])
    elsewhere.inherit(old)
    assert elsewhere.status(now=NOW)[0].crl_number is None


def test_a_reload_with_the_issuing_cas_certificate_renewed_on_its_key_keeps_the_crls_it_held(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A reload whose bundle has the issuing CA's certificate renewed on the same key (AD CS "renew with the same key
    pair"; the old certificate taken out), its CRL source unreadable meanwhile: the CRL held, signed by that key, stays
    and carol stays revoked. `inherit` kept only CRLs whose signer certificate itself was still configured: the CRL
    was dropped and carol, revoked, was unknown (served under revocation = "best-effort") until the source was read."""
    path = tmp_path / "issuing.crl"
    revoke(pki, pki.user_cert("carol"), now=NOW)
    path.write_bytes(pki.issuing_crl.read_bytes())
    old = CrlStore(trust, [CrlSource(str(path))])
    old.load_files(now=NOW)
    carol = verified(pki, trust, "carol")
    assert status(old, carol) is RevocationStatus.REVOKED
    issuing, root = load_cert(pki.issuing_cert), load_cert(pki.root_cert)
    renewed = (
        x509.CertificateBuilder()
        .subject_name(issuing.subject)
        .issuer_name(root.subject)
        .public_key(issuing.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(load_key(pki.root_key), hashes.SHA256())
    )
    reloaded_trust = TrustList(anchors=(root,), intermediates=(renewed,))
    path.unlink()  # the source gives nothing this time (a file being replaced, an http source down)
    reloaded = CrlStore(reloaded_trust, [CrlSource(str(path))])
    reloaded.inherit(old)
    reloaded.load_files(now=NOW)
    carol = verify_chain(load_cert(pki.user_cert("carol")), reloaded_trust, at=NOW)
    assert carol.chain[1] == renewed
    assert status(reloaded, carol) is RevocationStatus.REVOKED


def test_a_source_renamed_by_a_reload_starts_from_the_crls_the_old_name_held(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """`inherit` with a source renamed (a CRL file moved, a URL pointed at a mirror): the new name had no floor and
    took a replayed CRL, serving a certificate revoked since, the replay a reload of the same name refuses. A source
    the old configuration did not read starts from the CRLs of the sources it no longer reads (their trusted ones)."""
    older = pki.issuing_crl.read_bytes()
    revoke(pki, pki.user_cert("carol"), now=NOW)
    (tmp_path / "old-name.crl").write_bytes(pki.issuing_crl.read_bytes())
    old = CrlStore(trust, [CrlSource(str(tmp_path / "old-name.crl"))])
    old.load_files(now=NOW)
    carol = verified(pki, trust, "carol")
    assert status(old, carol) is RevocationStatus.REVOKED
    (tmp_path / "new-name.crl").write_bytes(older)  # what the path gives the new name: carol not yet revoked
    reloaded = CrlStore(trust, [CrlSource(str(tmp_path / "new-name.crl"))])
    reloaded.inherit(old)
    reloaded.load_files(now=NOW)
    assert status(reloaded, carol) is RevocationStatus.REVOKED
    assert "replayed?" in str(reloaded.status(now=NOW)[0].last_error)
    (tmp_path / "new-name.crl").write_bytes(pki.issuing_crl.read_bytes())  # the CA's current one: taken
    asyncio.run(reloaded.refresh(now=NOW))
    assert reloaded.status(now=NOW)[0].last_error is None
    assert status(reloaded, carol) is RevocationStatus.REVOKED


def test_an_unverified_crls_issuer_name_is_cut_short_in_its_error(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """Whoever is on the path of an http CRL source sends any CRL, unsigned by anyone trusted: its issuer name went
    whole into the source's error, which is a label of `kcd_crl_last_error` on every scrape, a `crl_rejected` log
    line at every refresh and part of /readyz (a 600 KiB name here; up to the 64 MiB a CRL may be). The name is cut
    to MAX_NAME_SHOWN characters in the error; the last good CRL stays."""
    asyncio.run(_test_an_unverified_crls_issuer_name_is_cut_short_in_its_error(pki, trust, tmp_path))


async def _test_an_unverified_crls_issuer_name_is_cut_short_in_its_error(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    from proxy.certs.revocation import MAX_NAME_SHOWN

    path = tmp_path / "issuing.crl"
    path.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(path))])
    store.load_files(now=NOW)
    good = store.current.crls
    rogue = serialization.load_pem_private_key(pki.rogue_issuing_key.read_bytes(), password=None)
    assert isinstance(rogue, ec.EllipticCurvePrivateKey)
    unit = x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60)
    huge = x509.Name([x509.RelativeDistinguishedName([unit])] * 10_000)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(huge)
        .last_update(NOW - timedelta(minutes=1))
        .next_update(NOW + timedelta(days=1))
        .sign(rogue, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    await store.refresh(now=NOW)
    assert store.current.crls == good
    error = str(store.status(now=NOW)[0].last_error)
    assert "is not in the trust list" in error
    assert len(error) < MAX_NAME_SHOWN + 200


def test_a_fresh_store_of_a_worker_refuses_a_crl_older_than_a_sibling_took(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """Two stores on one SharedTable (two workers): the first took CRL #2 (carol revoked); the file then holds #1
    again (a replay) and a store that starts empty (a worker replacing one that died) must not take it, or carol is
    served there. A store without the table (one worker) cannot know, as before: it takes #1."""
    path = tmp_path / "issuing.crl"
    old = pki.issuing_crl.read_bytes()
    revoke(pki, pki.user_cert("carol"), now=NOW)
    path.write_bytes(pki.issuing_crl.read_bytes())
    table = SharedTable(max_keys=8)
    first = CrlStore(trust, [CrlSource(str(path))], floors=table)
    assert first.load_files(now=NOW) == []
    path.write_bytes(old)
    replacement = CrlStore(trust, [CrlSource(str(path))], floors=table)
    [problem] = replacement.load_files(now=NOW)
    assert "CRL #1 of 'CN=Lab Issuing CA' is older than the one a worker of this gateway took (CRL number 2" in problem
    assert "replayed?" in problem
    assert (
        status(replacement, verified(pki, trust, "carol")) is RevocationStatus.UNKNOWN
    )  # no CRL: refused under require
    alone = CrlStore(trust, [CrlSource(str(path))])
    assert alone.load_files(now=NOW) == []
    assert status(alone, verified(pki, trust, "carol")) is RevocationStatus.GOOD


def test_crl_floors_keep_the_highest_per_scope_and_make_room_for_new_scopes() -> None:
    """A floor only rises (a lower number, or the same number with an earlier thisUpdate, leaves it); each scope has
    its own; numbers up to RFC 5280's 20 octets fit; past CRL_FLOORS scopes the one heard of longest ago goes."""
    table = SharedTable(max_keys=8)
    table.raise_crl_floor(b"a" * 16, 5, 100.0)
    table.raise_crl_floor(b"a" * 16, 4, 200.0)
    table.raise_crl_floor(b"a" * 16, 5, 50.0)
    assert table.crl_floor(b"a" * 16) == (5, 100.0)
    table.raise_crl_floor(b"a" * 16, 2**159, 300.0)
    assert table.crl_floor(b"a" * 16) == (2**159, 300.0)
    table.raise_crl_floor(b"b" * 16, -1, 10.0)  # a CRL without a number
    assert table.crl_floor(b"b" * 16) == (-1, 10.0)
    assert table.crl_floor(b"c" * 16) is None
    for n in range(CRL_FLOORS - 2):
        table.raise_crl_floor((n + 1).to_bytes(16, "big"), 1, 1000.0 + n)
    table.raise_crl_floor(b"d" * 16, 1, 5000.0)  # full: b's floor (thisUpdate 10) makes room
    assert table.crl_floor(b"d" * 16) == (1, 5000.0)
    assert table.crl_floor(b"b" * 16) is None
    assert table.crl_floor(b"a" * 16) == (2**159, 300.0)


def test_a_crl_number_longer_than_twenty_octets_is_taken_beside_the_shared_floor(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A CRL of a trusted CA whose number takes more than RFC 5280's 20 octets (a CA's own odd numbering): the store
    on the workers' table takes it as a store without one does (carol revoked), and its floor keeps replays below it
    out. Failed before: the floor's 21-octet field raised OverflowError out of the store (load_files, and a refresh's
    task), so the revocation went unseen with workers."""
    carol = verified(pki, trust, "carol")
    path = tmp_path / "issuing.crl"
    path.write_bytes(_issuing_crl(pki, 2**200, carol.leaf.serial_number))
    table = SharedTable(max_keys=8)
    store = CrlStore(trust, [CrlSource(str(path))], floors=table)
    assert store.load_files(now=NOW) == []
    assert status(store, carol) is RevocationStatus.REVOKED
    path.write_bytes(_issuing_crl(pki, 7, 1))  # an older CRL of that CA, replayed, in which carol is not listed
    replacement = CrlStore(trust, [CrlSource(str(path))], floors=table)
    [problem] = replacement.load_files(now=NOW)
    assert "older than the one a worker of this gateway took" in problem


def test_a_file_giving_a_crl_below_its_floor_is_named_behind_the_floors_until_a_newer_one_comes(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """`behind_floors`: a replacement worker's file source whose CRL is older than the one its siblings took (a replay)
    is named with why, what a replacement beside serving siblings refuses to start on (`proxy.app.build`); a file that
    is no CRL is not (`unreadable`'s), nor a source once a newer CRL is taken, nor one within its floor."""
    carol = verified(pki, trust, "carol")
    path, other = tmp_path / "issuing.crl", tmp_path / "junk.crl"
    path.write_bytes(_issuing_crl(pki, 3001, carol.leaf.serial_number))
    other.write_bytes(b"not a CRL")
    table = SharedTable(max_keys=8)
    sibling = CrlStore(trust, [CrlSource(str(path)), CrlSource(str(other))], floors=table)
    sibling.load_files(now=NOW)
    assert sibling.behind_floors() == {}
    path.write_bytes(_issuing_crl(pki, 3000, 1))  # replayed: carol not yet listed
    replacement = CrlStore(trust, [CrlSource(str(path)), CrlSource(str(other))], floors=table)
    replacement.load_files(now=NOW)
    [(location, why)] = replacement.behind_floors().items()
    assert location == str(path)
    assert "older than the one a worker of this gateway took (CRL number 3001" in why
    path.write_bytes(_issuing_crl(pki, 3002, carol.leaf.serial_number))
    asyncio.run(replacement.refresh(now=NOW))
    assert replacement.behind_floors() == {}
    assert status(replacement, carol) is RevocationStatus.REVOKED


def test_a_crl_with_a_negative_number_is_refused_and_the_other_sources_still_refresh(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A CRL of a trusted CA, genuinely signed, numbered below zero (RFC 5280 5.2.3: a non-negative integer) is refused
    as unparsable and the store's other source is still taken, on the workers' table too, whose floor field is
    unsigned (a negative number there would raise OverflowError out of the store). A pin: cryptography reads a CRL
    number as an unsigned integer, so the outline refuses it before any floor is asked."""
    carol = verified(pki, trust, "carol")
    odd, other = tmp_path / "odd.crl", tmp_path / "issuing.crl"
    odd.write_bytes(_negative_crl(pki, -5, 1))
    other.write_bytes(pki.issuing_crl.read_bytes())
    store = CrlStore(trust, [CrlSource(str(odd)), CrlSource(str(other))], floors=SharedTable(max_keys=8))
    [problem] = store.load_files(now=NOW)
    assert "odd.crl: CRL extensions cannot be parsed" in problem
    assert status(store, carol) is RevocationStatus.GOOD
    other.write_bytes(_issuing_crl(pki, 3, carol.leaf.serial_number))
    odd.write_bytes(_negative_crl(pki, -6, 1))
    asyncio.run(store.refresh(now=NOW))
    assert status(store, carol) is RevocationStatus.REVOKED


def test_a_crl_location_is_shown_without_a_urls_password() -> None:
    """`shown_location`: a URL's password and its query's values as `[redacted]` (the user name and the query's names
    kept), a fragment dropped, everything else as it is; a fetch error that quotes the URL, or the password or a token
    alone, is scrubbed the same way (`CrlSource.scrubbed`)."""
    assert shown_location("/etc/kcd/ca.crl") == "/etc/kcd/ca.crl"
    assert shown_location("http://crl.corp/ca.crl") == "http://crl.corp/ca.crl"
    assert shown_location("http://svc@crl.corp/ca.crl") == "http://svc@crl.corp/ca.crl"
    assert (
        shown_location("https://svc:pw:x@crl.corp:8443/ca.crl?v=1")
        == "https://svc:[redacted]@crl.corp:8443/ca.crl?v=[redacted]"
    )
    source = CrlSource("http://svc:Pa55word@crl.corp/ca.crl")
    assert source.name == "http://svc:[redacted]@crl.corp/ca.crl"
    error = "fetch failed: InvalidURL: http://svc:Pa55word@crl.corp/ca.crl (auth Pa55word)"
    assert source.scrubbed(error) == "fetch failed: InvalidURL: http://svc:[redacted]@crl.corp/ca.crl (auth [redacted])"
    assert CrlSource("/etc/kcd/ca.crl").scrubbed("no such file") == "no such file"
    signed = CrlSource("https://store.corp/ca.crl?sv=2&sig=T0ken%2Bx#part")
    assert signed.name == "https://store.corp/ca.crl?sv=[redacted]&sig=[redacted]"
    assert signed.scrubbed("403 for sig=T0ken+x, v2") == "403 for sig=[redacted], v2"


def test_a_url_is_scrubbed_as_aiohttp_spells_it_too() -> None:
    """aiohttp's errors quote a URL as yarl spells it: percent-escapes upper case (`%2b` as `%2B`), `%7e` as `~`, a
    password's `%41` as `A`. `CrlSource.scrubbed` takes those spellings out too, not only the configured one."""
    source = CrlSource("http://svc:p%41ssword@crl.corp/ca.crl?sv=2&sig=Ab%2bCd%3dSecretToken%7e")
    error = "400, message='Invalid header token', url='http://crl.corp/ca.crl?sv=2&sig=Ab%2BCd%3DSecretToken~'"
    assert "SecretToken" not in source.scrubbed(error)
    assert "[redacted]" in source.scrubbed(error)
    assert "pAssword" not in source.scrubbed("Cannot connect: http://svc:pAssword@crl.corp/ca.crl")


def _large_issuing_crl(pki: Pki, number: int, entries: int, listed: x509.Certificate) -> bytes:
    """A CRL of the lab's issuing CA numbered `number`: `entries` serials no user has, then `listed`'s (cACompromise,
    revoked at NOW less 90 minutes and 7 seconds)."""
    key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = x509.RevokedCertificateBuilder
    revoked = [
        builder().serial_number(serial).revocation_date(NOW - timedelta(hours=2)).build()
        for serial in range(10**30, 10**30 + entries)
    ]
    reason = x509.CRLReason(x509.ReasonFlags.ca_compromise)
    when = NOW - timedelta(minutes=90, seconds=7)
    revoked.append(
        builder().serial_number(listed.serial_number).revocation_date(when).add_extension(reason, False).build()
    )
    return (
        x509.CertificateRevocationListBuilder(
            issuer_name=load_cert(pki.issuing_cert).subject,
            last_update=NOW - timedelta(minutes=1),
            next_update=NOW + timedelta(days=1),
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number))],
            revoked_certificates=revoked,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def test_a_large_crls_entries_are_kept_out_of_the_garbage_collectors_sight(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A refresh that reads a CRL of 20,000 entries (a large CA's has 200,000 to millions) leaves a few dozen more
    objects for the garbage collector to walk, not one or more per entry; bob, whom it lists, is still refused with
    the CRL's revocation time and reason. Before, each entry was kept as a tuple key and an
    `Entry`: 40,000 tracked objects here, 400,000 for 200,000 entries, which a refresh's thread walked in nine full
    collections holding the GIL (the event loop stood still up to 0.24 s each, over a second on a loaded machine;
    `bench/gcpause.py`), and every later full collection walked again."""
    asyncio.run(_test_a_large_crls_entries_are_kept_out_of_the_garbage_collectors_sight(pki, trust, tmp_path))


async def _test_a_large_crls_entries_are_kept_out_of_the_garbage_collectors_sight(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    path = tmp_path / "large.crl"
    path.write_bytes(_issuing_crl(pki, 2, 1))
    store = CrlStore(trust, [CrlSource(str(path))])
    assert store.load_files(now=NOW) == []
    bob = verified(pki, trust, "bob")
    assert status(store, bob) is RevocationStatus.GOOD
    path.write_bytes(_large_issuing_crl(pki, 3, 20_000, bob.leaf))
    gc.collect()
    before = len(gc.get_objects())
    await store.refresh(now=NOW)
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert store.current.crls[0].number == 3
    assert grown < 1_000, f"{grown} more objects tracked by the garbage collector"
    evidence = store.current.lookup(bob.leaf, bob.chain[1], at=NOW, anchor=bob.chain[-1])
    assert evidence.status is RevocationStatus.REVOKED
    assert evidence.revoked_at == NOW - timedelta(minutes=90, seconds=7)
    assert "(reason cACompromise)" in evidence.detail, evidence.detail


def test_the_crls_a_refresh_replaces_are_freed_at_once(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """Twenty refreshes, each bringing a new CRL of 2,000 entries with the garbage collector off: every CRL replaced
    is freed by its reference count as the new one is kept (nothing holds it in a cycle, or anywhere), and the store
    holds the last one, so memory does not grow refresh after refresh, whether or not a collection runs."""
    asyncio.run(_test_the_crls_a_refresh_replaces_are_freed_at_once(pki, trust, tmp_path))


async def _test_the_crls_a_refresh_replaces_are_freed_at_once(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    path = tmp_path / "large.crl"
    bob = load_cert(pki.user_cert("bob"))
    path.write_bytes(_large_issuing_crl(pki, 2, 2_000, bob))
    store = CrlStore(trust, [CrlSource(str(path))])
    assert store.load_files(now=NOW) == []
    made = [weakref.ref(crl) for crl in store.current.crls]
    crls = [_large_issuing_crl(pki, number, 2_000, bob) for number in range(3, 23)]
    gc.disable()
    try:
        for crl in crls:
            path.write_bytes(crl)
            await store.refresh(now=NOW)
            made.extend(weakref.ref(crl) for crl in store.current.crls)
        # the executor's thread lets go of the last round's arguments (the set replaced) just after it answers
        deadline = time.monotonic() + 30
        while sum(ref() is not None for ref in made) > 1 and time.monotonic() < deadline:  # noqa: ASYNC110  weak references, polled
            await asyncio.sleep(0.01)
        alive = [kept.number for ref in made if (kept := ref()) is not None]
    finally:
        gc.enable()
    assert alive == [22]
    assert len(made) == 21


def _renewed_issuing(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The issuing CA renewed with a new key: a second CA certificate of its name, certified by the root."""
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(load_cert(pki.issuing_cert).subject)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


def _logged(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_a_source_giving_another_genuine_crl_keeps_the_scope_it_dropped_until_its_next_update(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A source that held the issuing CA's CRL #5 (carol revoked) gives the root's genuine CRL in its place: #5 is kept
    until its nextUpdate, as a failed fetch keeps it (carol revoked; `crl_scope_dropped` once, with a fix), #4 then
    given is refused as a replay of it, and past its nextUpdate it is let go (`crl_scope_released`): carol unknown."""
    asyncio.run(_test_a_source_giving_another_genuine_crl_keeps_the_scope_it_dropped(pki, trust, tmp_path))


async def _test_a_source_giving_another_genuine_crl_keeps_the_scope_it_dropped(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    path = tmp_path / "issuing.crl"
    carol, alice = verified(pki, trust, "carol"), verified(pki, trust, "alice")
    path.write_bytes(_issuing_crl(pki, 5, carol.serial))
    store = CrlStore(trust, [CrlSource(str(path))], policy="best-effort")
    assert store.load_files(now=NOW) == []
    path.write_bytes(pki.root_crl.read_bytes())
    with capture_logs() as logs:
        await store.refresh(now=NOW)
        await store.refresh(now=NOW)
    assert status(store, carol) is RevocationStatus.REVOKED
    assert status(store, alice) is RevocationStatus.GOOD
    rows = [(row.issuer, row.crl_number, row.last_error) for row in store.status(now=NOW)]
    assert rows[1:] == [("CN=Lab Issuing CA", 5, None)]
    assert rows[0][0] == "CN=Lab Root CA"
    (dropped,) = _logged(logs, "crl_scope_dropped")
    until = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert dropped["dropped"] == f"CRL #5 of 'CN=Lab Issuing CA' (kept until its nextUpdate {until})"
    assert str(path) in dropped["fix"]
    assert "best-effort" in dropped["fix"]
    path.write_bytes(_issuing_crl(pki, 4, 44))
    await store.refresh(now=NOW)
    assert "older than the CRL #5 of 'CN=Lab Issuing CA' already held" in (store.status(now=NOW)[0].last_error or "")
    assert status(store, carol) is RevocationStatus.REVOKED
    path.write_bytes(pki.root_crl.read_bytes())
    stale = NOW + timedelta(days=1, seconds=1)
    with capture_logs() as logs:
        await store.refresh(now=stale)
    assert status(store, carol, stale) is RevocationStatus.UNKNOWN
    assert [row.issuer for row in store.status(now=stale)] == ["CN=Lab Root CA"]
    assert [e["released"] for e in _logged(logs, "crl_scope_released")] == ["CRL #5 of 'CN=Lab Issuing CA'"]
    assert _logged(logs, "crl_scope_dropped") == []


def test_a_ca_key_rollover_served_from_the_same_source_still_works(pki: Pki, tmp_path: Path) -> None:
    """The issuing CA renewed with a new key (a new scope) and its source giving the new key's CRL #1 in place of the
    old key's #5: #1 is taken, nothing refused; #5 is kept until its nextUpdate (the old key's certificates still judged
    by it: carol revoked), then let go at the first read past it, the source's bytes unchanged (carol unknown, a
    certificate of the new key good throughout)."""
    asyncio.run(_test_a_ca_key_rollover_served_from_the_same_source_still_works(pki, tmp_path))


async def _test_a_ca_key_rollover_served_from_the_same_source_still_works(pki: Pki, tmp_path: Path) -> None:
    root = load_cert(pki.root_cert)
    renewed, new_key = _renewed_issuing(pki)
    trust = TrustList(anchors=(root,), intermediates=(load_cert(pki.issuing_cert), renewed))
    carol = verified(pki, trust, "carol")
    dave = (  # a certificate of the new key
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=dave"))
        .issuer_name(renewed.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .sign(new_key, hashes.SHA256())
    )
    path = tmp_path / "issuing.crl"
    path.write_bytes(_issuing_crl(pki, 5, carol.serial))
    store = CrlStore(trust, [CrlSource(str(path))])
    assert store.load_files(now=NOW) == []
    path.write_bytes(_crl_by(pki, new_key, 1, 999, next_update=timedelta(days=7)))
    with capture_logs() as logs:
        await store.refresh(now=NOW)
    assert _logged(logs, "crl_rejected") == []
    assert [e["crl_number"] for e in _logged(logs, "crl_loaded")] == [1]
    assert len(_logged(logs, "crl_scope_dropped")) == 1
    assert [row.crl_number for row in store.status(now=NOW)] == [1, 5]
    assert status(store, carol) is RevocationStatus.REVOKED
    stale = NOW + timedelta(days=1, seconds=1)
    assert store.current.lookup(dave, renewed, at=NOW, anchor=root).status is RevocationStatus.GOOD
    with capture_logs() as logs:
        await store.refresh(now=stale)
    assert store.current.lookup(dave, renewed, at=stale, anchor=root).status is RevocationStatus.GOOD
    assert [row.crl_number for row in store.status(now=stale)] == [1]
    assert [e["released"] for e in _logged(logs, "crl_scope_released")] == ["CRL #5 of 'CN=Lab Issuing CA'"]
    assert status(store, carol, stale) is RevocationStatus.UNKNOWN
