"""The CRLs workers keep for a replacement (`proxy.certs.kept`) and a replacement's store starting from them."""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from proxy.auth.shared import SharedTable
from proxy.certs import kept as kept_module
from proxy.certs import sources
from proxy.certs.chain import TrustList
from proxy.certs.kept import KeptCrls
from proxy.certs.revocation import RevocationStatus, crl_pem
from proxy.certs.sources import CrlSource, CrlStore
from proxy.lab.pki import Pki
from tests.unit.test_revocation_sources import NOW, _issuing_crl, forged_crl, status, verified
from tests.unit.test_revocation_sources import pki as pki  # the fixtures, re-exported
from tests.unit.test_revocation_sources import trust as trust

URL = "http://reader:s3cret-password@127.0.0.1:9/issuing.crl"


def _store(trust: TrustList, source: str, kept: KeptCrls, floors: SharedTable | None = None) -> CrlStore:
    return CrlStore(trust, [CrlSource(source)], floors=floors, kept=kept)


def test_a_worker_keeps_what_it_took_under_a_name_without_the_location(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """A file source's CRLs, once taken, are written whole under `<hash>.<number>.crl` (no part left, no password or
    path in the name); a source refused (a forged CRL) writes an empty file (its worker holds nothing of it), which is
    offered to no replacement."""
    source = tmp_path / "issuing.crl"
    source.write_bytes(_issuing_crl(pki, 5, 77))
    kept = KeptCrls(tmp_path / "crls", 2)
    assert _store(trust, str(source), kept).load_files(now=NOW) == []
    files = list((tmp_path / "crls").iterdir())
    assert [f.name.endswith(".2.crl") for f in files] == [True]
    assert files[0].read_bytes() == source.read_bytes()
    assert list(kept.offered(str(source))) == [source.read_bytes()]
    forged = tmp_path / "forged.crl"
    forged.write_bytes(forged_crl(pki, 77))
    _store(trust, str(forged), KeptCrls(tmp_path / "crls", 1)).load_files(now=NOW)
    assert sorted(f.stat().st_size for f in (tmp_path / "crls").iterdir()) == [0, len(source.read_bytes())]
    assert list(KeptCrls(tmp_path / "crls", 2).offered(str(forged))) == []
    kept = KeptCrls(tmp_path / "crls", 1)
    assert list(kept.offered(URL)) == []
    kept.keep(URL, source.read_bytes())
    assert list(kept.offered(URL)) == [source.read_bytes()]
    names = " ".join(f.name for f in (tmp_path / "crls").iterdir())
    assert "s3cret" not in names
    assert "issuing" not in names


def test_a_replacement_starts_from_the_newest_kept_crl_it_can_vet(trust: TrustList, pki: Pki, tmp_path: Path) -> None:
    """Siblings kept CRLs 6 (listing serial 66) and 7 (listing 77), a forged one numbered 99 also planted: a replacement
    whose source gives 5 takes 7 (the forged one passed over), refuses 5 as a replay, and says so."""
    directory = tmp_path / "crls"
    source = tmp_path / "issuing.crl"
    KeptCrls(directory, 1).keep(str(source), _issuing_crl(pki, 6, 66))
    KeptCrls(directory, 2).keep(str(source), _issuing_crl(pki, 7, 77))
    KeptCrls(directory, 3).keep(str(source), forged_crl(pki, 88))
    source.write_bytes(_issuing_crl(pki, 5, 55))
    store = _store(trust, str(source), KeptCrls(directory, 1, adopt=True))
    problems = store.load_files(now=NOW)
    assert [row.crl_number for row in store.status(now=NOW)] == [7]
    assert "older than the CRL #7" in problems[0]
    assert "replayed?" in problems[0]


def test_a_kept_crl_below_the_floor_or_older_than_the_source_is_not_taken(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """Kept CRL 6 under a floor of 7 (a worker took 7 since; the file is stale) is not taken; a source giving 8 beats a
    kept 7: the replacement holds what the source gave."""
    directory = tmp_path / "crls"
    source = tmp_path / "issuing.crl"
    KeptCrls(directory, 1).keep(str(source), _issuing_crl(pki, 6, 66))
    floors = SharedTable()
    source.write_bytes(_issuing_crl(pki, 7, 77))
    _store(trust, str(source), KeptCrls(directory, 2), floors).load_files(now=NOW)  # the sibling takes 7, keeps it
    (directory / next(directory.glob("*.2.crl")).name).write_bytes(_issuing_crl(pki, 6, 66))  # gone stale
    source.write_bytes(_issuing_crl(pki, 5, 55))
    replacement = _store(trust, str(source), KeptCrls(directory, 1, adopt=True, beside=(2,)), floors)
    replacement.load_files(now=NOW)
    assert [row.crl_number for row in replacement.status(now=NOW)] == [None]  # nothing: below the floor, both
    assert replacement.behind_floors() != {}
    KeptCrls(directory, 2).keep(str(source), _issuing_crl(pki, 7, 77))
    source.write_bytes(_issuing_crl(pki, 8, 88))
    newest = _store(trust, str(source), KeptCrls(directory, 1, adopt=True), floors)
    assert newest.load_files(now=NOW) == []
    assert [row.crl_number for row in newest.status(now=NOW)] == [8]


def test_a_url_source_starts_from_the_kept_crl_when_its_first_fetch_fails(
    pki: Pki, trust: TrustList, tmp_path: Path
) -> None:
    """A replacement whose CRL URL does not answer at its first fetch holds the kept CRL (carol revoked) instead of
    nothing; so does a first worker (not a replacement), which reads the kept files once a read left it holding none
    (a withheld answer: served without, it passed what its siblings' CRL revokes)."""
    asyncio.run(_url_source_starts_from_the_kept_crl(pki, trust, tmp_path))


async def _url_source_starts_from_the_kept_crl(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    directory = tmp_path / "crls"
    carol = verified(pki, trust, "carol")
    KeptCrls(directory, 2).keep(URL, _issuing_crl(pki, 7, carol.serial))
    replacement = CrlStore(trust, [CrlSource(URL)], timeout=2.0, kept=KeptCrls(directory, 1, adopt=True))
    first = CrlStore(trust, [CrlSource(URL)], timeout=2.0, kept=KeptCrls(directory, 1))
    try:
        await replacement.refresh(now=NOW)
        await first.refresh(now=NOW)
    finally:
        await replacement.close()
        await first.close()
    assert status(replacement, carol) is RevocationStatus.REVOKED
    assert status(first, carol) is RevocationStatus.REVOKED


def test_a_source_giving_the_kept_bytes_is_not_vetted_twice(trust: TrustList, pki: Pki, tmp_path: Path) -> None:
    """Two workers kept the same CRL and the source still gives it: the replacement reads it once (one
    `crl_taken_from_siblings`, no `crl_loaded` for the same bytes), and the source counts as read."""
    directory, source = tmp_path / "crls", tmp_path / "issuing.crl"
    source.write_bytes(_issuing_crl(pki, 7, 77))
    for number in (1, 2):
        KeptCrls(directory, number).keep(str(source), source.read_bytes())
    store = _store(trust, str(source), KeptCrls(directory, 1, adopt=True))
    with capture_logs() as logs:
        assert store.load_files(now=NOW) == []
    assert [e["event"] for e in logs if e["event"].startswith("crl_")] == ["crl_taken_from_siblings"]
    assert store.status(now=NOW)[0].last_success == NOW


def test_a_reload_keeps_a_renamed_source_s_crls_under_its_new_name(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """A reload points the CRL at a URL that does not answer: the reloaded store holds the old source's CRL (carol
    revoked) and keeps it under the new URL, where a replacement (which reads the reloaded configuration) finds it."""
    asyncio.run(_reload_keeps_a_renamed_source(pki, trust, tmp_path))


async def _reload_keeps_a_renamed_source(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    directory, old = tmp_path / "crls", tmp_path / "issuing.crl"
    carol = verified(pki, trust, "carol")
    old.write_bytes(_issuing_crl(pki, 7, carol.serial))
    running = _store(trust, str(old), KeptCrls(directory, 2))
    assert running.load_files(now=NOW) == []
    reloaded = CrlStore(trust, [CrlSource(URL)], timeout=2.0, kept=KeptCrls(directory, 2))
    reloaded.inherit(running)
    replacement = CrlStore(trust, [CrlSource(URL)], timeout=2.0, kept=KeptCrls(directory, 1, adopt=True))
    try:
        await reloaded.refresh(now=NOW)
        await replacement.refresh(now=NOW)
    finally:
        await reloaded.close()
        await replacement.close()
    assert status(reloaded, carol) is RevocationStatus.REVOKED
    assert status(replacement, carol) is RevocationStatus.REVOKED


def test_a_pem_source_is_kept_as_its_crl_blocks_alone(trust: TrustList, pki: Pki, tmp_path: Path) -> None:
    """A DER CRL is kept as it came, a PEM file as openssl writes its blocks (the same bytes for a file openssl wrote),
    whatever text a sender put around or inside them (up to MAX_CRL_BYTES, each refresh)."""
    der = _issuing_crl(pki, 7, 77)
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    assert crl_pem(der) == pem
    source, directory = tmp_path / "issuing.crl", tmp_path / "crls"
    padded = b"x" * 100_000 + b"\n" + pem.replace(b"\n", b"\r\n" + b" " * 1000)
    for given, written in ((der, der), (pem, pem), (padded, pem), (padded + pem, pem + pem)):
        source.write_bytes(given)
        assert _store(trust, str(source), KeptCrls(directory, 1)).load_files(now=NOW) == []
        assert list(KeptCrls(directory, 1).offered(str(source))) == [written]


def test_kept_files_are_offered_in_the_order_they_were_written(pki: Pki, tmp_path: Path) -> None:
    """The kept files of a source come oldest written first, whatever their worker numbers (the last one offered, if
    it vets, is what a replacement holds of another scope)."""
    directory, crls = tmp_path / "crls", {number: _issuing_crl(pki, number, number) for number in (1, 2, 3)}
    for number, mtime in ((1, 30), (2, 10), (3, 20)):
        KeptCrls(directory, number).keep(URL, crls[number])
        os.utime(next(directory.glob(f"*.{number}.crl")), ns=(mtime, mtime))
    assert list(KeptCrls(directory, 4).offered(URL)) == [crls[2], crls[3], crls[1]]


def test_a_replacement_that_started_from_a_kept_crl_takes_a_newer_one_as_its_siblings_do(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """A replacement that took kept CRL 7 and refused its source's 5 takes the source's 8 at its next refresh, and
    keeps it in its own file (written last: the one a later replacement takes)."""
    directory, source = tmp_path / "crls", tmp_path / "issuing.crl"
    KeptCrls(directory, 2).keep(str(source), _issuing_crl(pki, 7, 77))
    source.write_bytes(_issuing_crl(pki, 5, 55))
    store = _store(trust, str(source), KeptCrls(directory, 1, adopt=True), SharedTable())
    assert "replayed?" in store.load_files(now=NOW)[0]
    source.write_bytes(newer := _issuing_crl(pki, 8, 88))
    asyncio.run(store.refresh(now=NOW))
    assert [row.crl_number for row in store.status(now=NOW)] == [8]
    assert list(KeptCrls(directory, 3).offered(str(source)))[-1] == newer


def test_a_worker_keeps_the_scope_its_source_dropped_for_a_replacement(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """A source giving the root's CRL in place of the issuing CA's #7 (carol revoked): the worker keeps both, #7 held
    until its nextUpdate, so a replacement whose source gives the root's CRL starts from them (carol revoked there too);
    past that nextUpdate the worker keeps what the source gives alone."""
    directory, source = tmp_path / "crls", tmp_path / "issuing.crl"
    carol = verified(pki, trust, "carol")
    source.write_bytes(_issuing_crl(pki, 7, carol.serial))
    worker = _store(trust, str(source), KeptCrls(directory, 1))
    assert worker.load_files(now=NOW) == []
    source.write_bytes(pki.root_crl.read_bytes())
    asyncio.run(worker.refresh(now=NOW))
    replacement = _store(trust, str(source), KeptCrls(directory, 2, adopt=True))
    assert replacement.load_files(now=NOW) == []
    assert status(replacement, carol) is RevocationStatus.REVOKED
    assert [row.issuer for row in replacement.status(now=NOW)] == ["CN=Lab Root CA", "CN=Lab Issuing CA"]
    asyncio.run(worker.refresh(now=NOW + timedelta(days=1, seconds=1)))
    assert next(directory.glob("*.1.crl")).read_bytes() == source.read_bytes()


def test_a_replacement_refuses_an_older_crl_only_beside_a_sibling_whose_kept_file_holds_one(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """The workers' floor is #7 (a worker took it and died, its kept file gone); the sibling serving (number 2) holds
    nothing of the source (given #5, below the floor): its kept file is empty. A replacement beside it given #5 too no
    longer refuses the source (nothing to refuse it for: the sibling passes what #7 revokes as well); its own file says
    it holds nothing, so the other number's replacement does not either. Beside a sibling whose file is missing (no
    witness) or holds a CRL of the source (#8, kept beside the root's CRL an attacker on the path swapped in, below the
    floor #9 of a worker that died since), it still refuses."""
    directory, source, floors = tmp_path / "crls", tmp_path / "issuing.crl", SharedTable()
    source.write_bytes(_issuing_crl(pki, 7, 77))
    _store(trust, str(source), KeptCrls(directory, 1), floors).load_files(now=NOW)
    next(directory.glob("*.1.crl")).unlink()  # worker 1 died; what it kept is gone
    source.write_bytes(_issuing_crl(pki, 5, 55))  # a replay, below the floor
    _store(trust, str(source), KeptCrls(directory, 2), floors).load_files(now=NOW)
    assert next(directory.glob("*.2.crl")).read_bytes() == b""  # sibling 2 holds nothing of it
    first = _store(trust, str(source), KeptCrls(directory, 1, adopt=True, beside=(2,)), floors)
    first.load_files(now=NOW)
    assert first.behind_floors() == {}
    assert next(directory.glob("*.1.crl")).read_bytes() == b""
    other = _store(trust, str(source), KeptCrls(directory, 2, adopt=True, beside=(1,)), floors)
    other.load_files(now=NOW)
    assert other.behind_floors() == {}
    unwitnessed = _store(trust, str(source), KeptCrls(directory, 3, adopt=True, beside=(4,)), floors)
    unwitnessed.load_files(now=NOW)
    assert list(unwitnessed.behind_floors()) == [str(source)]
    source.write_bytes(_issuing_crl(pki, 8, 88))
    holding = _store(trust, str(source), KeptCrls(directory, 2), floors)
    holding.load_files(now=NOW)  # sibling 2 takes #8, then the path swaps in the root's CRL: #8 carried and kept
    source.write_bytes(pki.root_crl.read_bytes())
    asyncio.run(holding.refresh(now=NOW))
    assert b"BEGIN X509 CRL" in next(directory.glob("*.2.crl")).read_bytes()
    source.write_bytes(_issuing_crl(pki, 9, 99))  # a third worker takes #9 and dies, its file gone: #8 below the floor
    _store(trust, str(source), KeptCrls(directory, 3), floors).load_files(now=NOW)
    next(directory.glob("*.3.crl")).unlink()
    source.write_bytes(_issuing_crl(pki, 5, 55))
    beside_holding = _store(trust, str(source), KeptCrls(directory, 1, adopt=True, beside=(2,)), floors)
    beside_holding.load_files(now=NOW)
    assert list(beside_holding.behind_floors()) == [str(source)]


def _large_issuing_crl(pki: Pki, number: int, serial: int, entries: int) -> bytes:
    """A DER CRL of the lab's issuing CA numbered `number`, listing `serial` and `entries` other serials."""
    key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes()).subject)
        .last_update(NOW - timedelta(minutes=1))
        .next_update(NOW + timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for listed in (serial, *range(10**20, 10**20 + entries)):
        entry = x509.RevokedCertificateBuilder().serial_number(listed).revocation_date(NOW - timedelta(hours=1))
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_kept_file_past_the_crl_size_limit_still_starts_a_replacement(
    trust: TrustList, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit lowered to just above a real CRL of the issuing CA (#7, carol and 3,000 others: a source's answer at
    the limit); the source then gives the root's CRL and the worker keeps #7 beside it (left33): its kept file is a PEM
    bundle, a third larger than the limit. A replacement read kept files with the limit of one source's answer and
    skipped it (carol unknown there, revoked on its sibling); it now reads them with the bound of what a worker may hold
    of a source (`MAX_KEPT_BYTES`: twice the limit) and starts from it: carol revoked. Past that bound a worker removes
    its file and says so (`crl_not_kept`) rather than leave one a replacement would skip."""
    carol = verified(pki, trust, "carol")
    large = _large_issuing_crl(pki, 7, carol.serial, 3000)
    limit = len(large) + 1024
    monkeypatch.setattr(sources, "MAX_CRL_BYTES", limit)  # a source's answer
    monkeypatch.setattr(kept_module, "MAX_CRL_BYTES", limit)
    monkeypatch.setattr(kept_module, "MAX_KEPT_BYTES", 2 * limit)
    directory, source = tmp_path / "crls", tmp_path / "issuing.crl"
    source.write_bytes(large)
    worker = _store(trust, str(source), KeptCrls(directory, 1))
    assert worker.load_files(now=NOW) == []
    source.write_bytes(pki.root_crl.read_bytes())
    asyncio.run(worker.refresh(now=NOW))
    assert limit < next(directory.glob("*.1.crl")).stat().st_size <= 2 * limit
    replacement = _store(trust, str(source), KeptCrls(directory, 2, adopt=True))
    assert replacement.load_files(now=NOW) == []
    assert status(replacement, carol) is RevocationStatus.REVOKED
    monkeypatch.setattr(kept_module, "MAX_KEPT_BYTES", limit)
    source.write_bytes(large)
    bounded = _store(trust, str(source), KeptCrls(directory, 3))
    bounded.load_files(now=NOW)
    assert next(directory.glob("*.3.crl")).read_bytes() == large
    source.write_bytes(pki.root_crl.read_bytes())
    with capture_logs() as logs:
        asyncio.run(bounded.refresh(now=NOW))
    assert [e["source"] for e in logs if e["event"] == "crl_not_kept"] == [str(source)]
    assert list(directory.glob("*.3.crl")) == []


def test_a_kept_file_that_cannot_be_rewritten_is_removed_not_left_saying_less(pki: Pki, tmp_path: Path) -> None:
    """A worker's file says it holds nothing (empty); its next write (the CRL it took) fails, as on a full disk (the
    part's name taken by a directory): the empty file is removed, so that a replacement beside it reads no witness
    that it holds nothing, and refuses an older CRL of that source as before."""
    directory, location = tmp_path / "crls", "http://127.0.0.1:9/issuing.crl"
    worker = KeptCrls(directory, 2)
    worker.keep(location, b"")
    assert not KeptCrls(directory, 1, beside=(2,)).held_beside(location)
    (directory / f".{kept_module._name(location)}.{os.getpid()}.{threading.get_ident()}.part").mkdir()
    assert worker.keep(location, _issuing_crl(pki, 7, 77)) == "IsADirectoryError: Is a directory"  # logged: why
    assert list(directory.glob("*.crl")) == []
    assert KeptCrls(directory, 1, beside=(2,)).held_beside(location)


def test_a_running_worker_refused_below_the_floor_while_holding_nothing_starts_from_its_siblings_crl(
    trust: TrustList, pki: Pki, tmp_path: Path
) -> None:
    """A first worker (not a replacement) whose source gave nothing, then #5 below the floor #7 its sibling took (a
    replay to it alone): it starts the source from the sibling's kept #7 (carol's serial revoked there too), keeps it
    as its own file, and refuses #5 again as older than what it holds."""
    directory, source, floors = tmp_path / "crls", tmp_path / "issuing.crl", SharedTable()
    carol = verified(pki, trust, "carol")
    worker = _store(trust, str(source), KeptCrls(directory, 1), floors)
    assert worker.load_files(now=NOW) != []  # no file yet: nothing held
    source.write_bytes(_issuing_crl(pki, 7, carol.serial))
    _store(trust, str(source), KeptCrls(directory, 2), floors).load_files(now=NOW)
    source.write_bytes(_issuing_crl(pki, 5, 55))
    with capture_logs() as logs:
        asyncio.run(worker.refresh(now=NOW))
    assert [e["crl_number"] for e in logs if e["event"] == "crl_taken_from_siblings"] == [7]
    assert status(worker, carol) is RevocationStatus.REVOKED
    assert next(directory.glob("*.1.crl")).read_bytes() == next(directory.glob("*.2.crl")).read_bytes()
    with capture_logs() as logs:
        asyncio.run(worker.refresh(now=NOW))
    assert ["already held" in e["problem"] for e in logs if e["event"] == "crl_rejected"] == [True]
