"""OCSP answers: believed only when signed by the CA or its responder, for our certificate, fresh; then cached."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs.ocsp import OcspClient, OcspError, build_request, responder_url, verify_response
from proxy.certs.revocation import RevocationEvidence, RevocationStatus
from proxy.lab.pki import Pki, make_pki
from tests.pem import load_cert, load_key

NOW = datetime.now(UTC).replace(microsecond=0)
NONCE = b"0123456789abcdef"
URL = "http://ocsp.test/"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), now=NOW, ocsp_url="http://127.0.0.1:9/ocsp")


def answer(
    pki: Pki,
    subject: x509.Certificate,
    *,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    signer: str = "responder",
    nonce: bytes | None = NONCE,
    this_update: datetime = NOW,
    next_update: datetime | None = None,
    attached: int = 1,
) -> bytes:
    """A DER OCSP response about `subject`, as a responder would sign it (its certificate attached `attached` times)."""
    issuing = load_cert(pki.issuing_cert)
    revoked = status is ocsp.OCSPCertStatus.REVOKED
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=subject,
        issuer=issuing,
        algorithm=hashes.SHA1(),  # noqa: S303 -- what CertIDs use
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=NOW - timedelta(hours=1) if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    signing_cert, signing_key = {
        "responder": (load_cert(pki.ocsp_cert), load_key(pki.ocsp_key)),
        "ca": (issuing, load_key(pki.issuing_key)),
        "rogue": (load_cert(pki.rogue_issuing_cert), load_key(pki.rogue_issuing_key)),
        "server": (load_cert(pki.server_cert), load_key(pki.server_key)),  # issued by the CA, but not for OCSP
        "tampered": (issuing, load_key(pki.issuing_key)),  # the CA's, with one bit of the signature flipped below
    }[signer]
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signing_cert)
    if signer not in ("ca", "tampered") and attached:
        builder = builder.certificates([signing_cert] * attached)
    der = builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return der[:-1] + bytes([der[-1] ^ 1]) if signer == "tampered" else der


def verify(pki: Pki, der: bytes, user: str = "alice", at: datetime = NOW) -> tuple[RevocationStatus, str]:
    subject, issuing = load_cert(pki.user_cert(user)), load_cert(pki.issuing_cert)
    request = build_request(subject, issuing, NONCE)
    evidence, _, _ = verify_response(der, request, issuing, nonce=NONCE, at=at, source=URL)
    return evidence.status, evidence.detail


@pytest.mark.parametrize(
    ("status", "signer", "expected"),
    [
        (ocsp.OCSPCertStatus.GOOD, "responder", RevocationStatus.GOOD),
        (ocsp.OCSPCertStatus.REVOKED, "responder", RevocationStatus.REVOKED),
        (ocsp.OCSPCertStatus.UNKNOWN, "responder", RevocationStatus.UNKNOWN),
        (ocsp.OCSPCertStatus.GOOD, "ca", RevocationStatus.GOOD),
    ],
)
def test_checked_answers_become_evidence(
    pki: Pki, status: ocsp.OCSPCertStatus, signer: str, expected: RevocationStatus
) -> None:
    """Good, revoked and unknown from the delegated responder (or the CA itself) are evidence of that status."""
    got, detail = verify(pki, answer(pki, load_cert(pki.user_cert("alice")), status=status, signer=signer))
    assert got is expected
    if expected is RevocationStatus.REVOKED:
        assert "(reason keyCompromise, per OCSP)" in detail


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"signer": "rogue"}, "the responder's certificate was not issued by the certificate's CA"),
        ({"signer": "tampered"}, "the response's signature does not verify"),
        ({"signer": "server"}, "not issued for OCSP signing"),
        ({"nonce": b"another nonce..."}, "nonce is not the one sent"),
        ({"nonce": None, "this_update": NOW - timedelta(hours=1)}, "no nonce, and thisUpdate"),
        ({"next_update": NOW - timedelta(minutes=1), "this_update": NOW - timedelta(hours=1)}, "the answer is stale"),
        ({"this_update": NOW + timedelta(hours=1)}, "is in the future"),
    ],
)
def test_unbelievable_answers_are_refused(pki: Pki, kwargs: dict[str, object], why: str) -> None:
    """Wrong signer, a responder certificate without id-kp-OCSPSigning, a replayed or stale answer: OcspError."""
    with pytest.raises(OcspError, match=why):
        verify(pki, answer(pki, load_cert(pki.user_cert("alice")), **kwargs))  # type: ignore[arg-type]


def test_a_responder_without_ocsp_signing_is_refused_when_its_ca_has_it() -> None:
    """A CA whose own certificate carries id-kp-OCSPSigning (and no other usage) issues a responder certificate with
    no extended key usage: the responder's answer is refused, the CA's EKU is not inherited (RFC 6960 4.2.2.2: the
    responder's certificate itself must include it)."""
    ca_key, responder_key, user_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))

    def issued(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA with OCSPSigning")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca = issued("CA with OCSPSigning", ca_key, ca=True)
    responder, user = issued("responder", responder_key, ca=False), issued("user", user_key, ca=False)
    der = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=user,
            issuer=ca,
            algorithm=hashes.SHA1(),  # noqa: S303 -- what CertIDs use
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW,
            next_update=None,
            revocation_time=None,
            revocation_reason=None,
        )
        .add_extension(x509.OCSPNonce(NONCE), critical=False)
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
        .certificates([responder])
        .sign(responder_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(OcspError, match="not issued for OCSP signing"):
        verify_response(der, build_request(user, ca, NONCE), ca, nonce=NONCE, at=NOW, source=URL)


@pytest.mark.parametrize(("attached", "refused"), [(0, False), (10, False), (11, True), (3000, True)])
def test_an_answer_with_more_than_ten_certificates_is_refused_before_they_are_read(
    pki: Pki, attached: int, refused: bool
) -> None:
    """The delegated responder's good answer counts with up to 10 certificates attached (0: the responder's certificate
    missing, refused for that); with more it is refused before cryptography reads them (quadratic, holding the GIL)."""
    der = answer(pki, load_cert(pki.user_cert("alice")), attached=attached)
    if refused:
        with pytest.raises(OcspError, match="carries more than 10 certificates"):
            verify(pki, der)
    elif attached:
        assert verify(pki, der)[0] is RevocationStatus.GOOD
    else:
        with pytest.raises(OcspError, match="signed by neither the CA nor a responder it authorised"):
            verify(pki, der)


def test_answer_about_another_certificate_is_refused(pki: Pki) -> None:
    """A good answer for bob does not vouch for alice."""
    with pytest.raises(OcspError, match="does not answer for the certificate asked about"):
        verify(pki, answer(pki, load_cert(pki.user_cert("bob"))), user="alice")


def test_responder_url_comes_from_authority_information_access(pki: Pki) -> None:
    """The leaf names the lab responder; a CA certificate without AIA names none."""
    assert responder_url(load_cert(pki.user_cert("alice"))) == "http://127.0.0.1:9/ocsp"
    assert responder_url(load_cert(pki.issuing_cert)) is None


def test_client_caches_answers_and_failures(pki: Pki) -> None:
    """One POST per certificate while the answer is cached; a dead responder gives UNKNOWN evidence, not an error."""
    asyncio.run(_client_caches_answers_and_failures(pki))


async def _client_caches_answers_and_failures(pki: Pki) -> None:
    posts: list[bytes] = []

    async def responder(request: web.Request) -> web.Response:
        body = await request.read()
        posts.append(body)
        nonce = ocsp.load_der_ocsp_request(body).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        return web.Response(body=answer(pki, load_cert(pki.user_cert("alice")), nonce=nonce))

    app = web.Application()
    app.router.add_post("/", responder)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    alice = _with_responder(pki, f"http://127.0.0.1:{port}/")
    client = OcspClient(cache_seconds=60)
    try:
        issuing = load_cert(pki.issuing_cert)
        first, second = await asyncio.gather(
            client.status(alice, issuing, at=NOW), client.status(alice, issuing, at=NOW)
        )
        assert (first.status, second.status, len(posts)) == (RevocationStatus.GOOD, RevocationStatus.GOOD, 1)
        assert (await client.status(alice, issuing, at=NOW + timedelta(seconds=59))).status is RevocationStatus.GOOD
        assert len(posts) == 1
        await client.status(alice, issuing, at=NOW + timedelta(seconds=61))
        assert len(posts) == 2
    finally:
        await runner.cleanup()
    dead = await client.status(alice, issuing, at=NOW + timedelta(seconds=200))
    assert dead.status is RevocationStatus.UNKNOWN
    assert dead.detail.startswith(f"no usable answer from the OCSP responder http://127.0.0.1:{port}/")
    await client.close()


@contextlib.asynccontextmanager
async def _serving(responder: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """A real HTTP OCSP responder on a loopback port answering POSTs with `responder`; yields its URL."""
    app = web.Application()
    app.router.add_post("/", responder)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


def _with_responder(pki: Pki, url: str, *, serial: int | None = None) -> x509.Certificate:
    """alice's certificate, reissued (same key; same serial unless `serial`) to name `url` as its OCSP responder."""
    alice = load_cert(pki.user_cert("alice"))
    aia = x509.AuthorityInformationAccess(
        [x509.AccessDescription(x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url))]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(alice.subject)
        .issuer_name(alice.issuer)
        .public_key(alice.public_key())
        .serial_number(alice.serial_number if serial is None else serial)
        .not_valid_before(alice.not_valid_before_utc)
        .not_valid_after(alice.not_valid_after_utc)
        .add_extension(aia, critical=False)
    )
    return builder.sign(load_key(pki.issuing_key), hashes.SHA256())


def test_an_answer_naming_a_hash_no_one_knows_is_no_answer_not_a_crash(pki: Pki) -> None:
    """A responder (or anyone on the plain-http path to it) answers with a CertID whose hash algorithm is an OID
    cryptography does not know: `UnsupportedAlgorithm` escaped before the signature was looked at, through the
    revocation stage (a 500 for every request of that certificate, never cached, the CRL verdict never reached).
    It is an answer not believed: OcspError from `verify_response`, UNKNOWN evidence from the client."""
    sha1 = bytes.fromhex("06052b0e03021a")  # the CertID's hashAlgorithm, 1.3.14.3.2.26
    good = answer(pki, load_cert(pki.user_cert("alice")))
    assert sha1 in good
    odd = good.replace(sha1, bytes.fromhex("06052b0e03021b"), 1)  # 1.3.14.3.2.27, same length
    with pytest.raises(OcspError, match=r"1\.3\.14\.3\.2\.27"):
        verify(pki, odd)
    asyncio.run(_client_takes_an_odd_answer_as_none(pki, odd))


async def _client_takes_an_odd_answer_as_none(pki: Pki, odd: bytes) -> None:
    async def responder(_request: web.Request) -> web.Response:
        return web.Response(body=odd)

    async with _serving(responder) as url:
        client = OcspClient(cache_seconds=60)
        try:
            evidence = await client.status(_with_responder(pki, url), load_cert(pki.issuing_cert), at=NOW)
            assert evidence.status is RevocationStatus.UNKNOWN
            assert "no usable answer" in evidence.detail
        finally:
            await client.close()


def test_the_answer_cache_keeps_at_most_its_size_the_least_recently_used_out(pki: Pki) -> None:
    """Every certificate a trusted CA issued with an OCSP URL got a cache entry kept for ever (the cache was a plain
    dict, never pruned): many certificates, or one CA's users over months, grew it without bound. At most `size`
    answers are kept now, the least recently used dropped first; a kept one is still answered without a POST."""
    asyncio.run(_cache_keeps_at_most_its_size(pki))


async def _cache_keeps_at_most_its_size(pki: Pki) -> None:
    posts: list[int] = []
    issued: dict[int, x509.Certificate] = {}

    async def responder(request: web.Request) -> web.Response:
        asked = ocsp.load_der_ocsp_request(await request.read())
        posts.append(asked.serial_number)
        nonce = asked.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        return web.Response(body=answer(pki, issued[asked.serial_number], nonce=nonce))

    async with _serving(responder) as url:
        client = OcspClient(cache_seconds=60, size=4)
        issuing = load_cert(pki.issuing_cert)
        try:
            for serial in range(1000, 1012):
                issued[serial] = _with_responder(pki, url, serial=serial)
            for serial, cert in issued.items():
                assert (await client.status(cert, issuing, at=NOW)).status is RevocationStatus.GOOD
                assert client.kept <= 4, f"{client.kept} answers kept after serial {serial}"
            await client.status(issued[1008], issuing, at=NOW)  # kept (1008-1011), and now the most recently used
            await client.status(issued[1000], issuing, at=NOW)  # dropped long ago: asked again; 1009 makes room
            # still kept: the least recently used went, not the oldest
            await client.status(issued[1008], issuing, at=NOW)
            assert posts == [*range(1000, 1012), 1000]
        finally:
            await client.close()


def test_a_revoked_answer_outlives_a_churn_of_good_ones(pki: Pki) -> None:
    """The answer cache's least-recently-used eviction dropped a "revoked" answer still within its time when enough
    other certificates' "good" answers came after it (every user of a large CA, or one holding many certificates):
    the revoked certificate's next request asked the responder again, and with the responder down that was UNKNOWN,
    which `ocsp = "best-effort"` serves. A "revoked" answer is kept apart now, not evicted by other answers (only the
    CA can make one), and answers until its time is up, as before the cache was bounded."""
    asyncio.run(_revoked_answer_outlives_a_churn(pki))


async def _revoked_answer_outlives_a_churn(pki: Pki) -> None:
    posts: list[int] = []
    issued: dict[int, x509.Certificate] = {}
    down = False

    async def responder(request: web.Request) -> web.Response:
        asked = ocsp.load_der_ocsp_request(await request.read())
        posts.append(asked.serial_number)
        if down:
            return web.Response(status=503)
        nonce = asked.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        status = ocsp.OCSPCertStatus.REVOKED if asked.serial_number == 2000 else ocsp.OCSPCertStatus.GOOD
        return web.Response(body=answer(pki, issued[asked.serial_number], nonce=nonce, status=status))

    async with _serving(responder) as url:
        client = OcspClient(cache_seconds=3600, size=2)
        issuing = load_cert(pki.issuing_cert)
        try:
            for serial in (2000, *range(1000, 1004)):
                issued[serial] = _with_responder(pki, url, serial=serial)
            assert (await client.status(issued[2000], issuing, at=NOW)).status is RevocationStatus.REVOKED
            for serial in range(1000, 1004):  # the churn: more good answers than the cache keeps
                assert (await client.status(issued[serial], issuing, at=NOW)).status is RevocationStatus.GOOD
            down = True
            again = await client.status(issued[2000], issuing, at=NOW + timedelta(minutes=1))
            assert again.status is RevocationStatus.REVOKED, again.detail
            assert posts == [2000, *range(1000, 1004)]  # answered from the cache, the responder not asked
            assert (await client.status(issued[1000], issuing, at=NOW)).status is RevocationStatus.UNKNOWN  # evicted
            assert client.kept <= 3
        finally:
            await client.close()


def test_a_responder_urls_token_is_not_shown_in_part_where_the_error_is_cut(pki: Pki) -> None:
    """A signed responder URL (`?sig=<token>`) and an answer whose head aiohttp refuses, padded so that its error
    (which quotes the URL) is cut to 300 characters inside the token: the evidence's detail (the device's 403, the
    `ocsp_failed` line) holds no part of the token. Before, the error was cut first and scrubbed after, when the
    whole token was no longer there to find: its first 20 characters were shown."""
    asyncio.run(_token_cut_short(pki))


async def _token_cut_short(pki: Pki) -> None:
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    pad = 0

    async def answer_bad_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Bad\x01: " + b"B" * pad + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_bad_head, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/?sig={secret}"
    try:
        async with aiohttp.ClientSession() as session:  # where the token lands in aiohttp's error, unpadded
            with pytest.raises(aiohttp.ClientResponseError) as raised:
                async with session.post(url, data=b"x"):
                    pass
        unpadded = " ".join(str(raised.value).split()).index(secret)
        pad = 250 - unpadded  # the token from character 250 on: the cut at 270 (of 315) falls 20 characters into it
        assert pad > 0
        client = OcspClient(cache_seconds=60)
        try:
            evidence = await client.status(_with_responder(pki, url), load_cert(pki.issuing_cert), at=NOW)
        finally:
            await client.close()
        assert "Invalid header token" in evidence.detail
        assert secret[:8] not in evidence.detail, evidence.detail
    finally:
        server.close()
        await server.wait_closed()


def _checked_responder(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A delegated responder of the issuing CA (id-kp-OCSPSigning) without id-pkix-ocsp-nocheck: its own revocation is
    for the gateway's CRLs to judge (RFC 6960 4.2.2.2.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuing = load_cert(pki.issuing_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Checked OCSP responder")]))
        .issuer_name(issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    )
    return builder.sign(load_key(pki.issuing_key), hashes.SHA256()), key


def test_a_cached_answer_of_a_responder_revoked_since_is_no_answer(pki: Pki) -> None:
    """A delegated responder without id-pkix-ocsp-nocheck answers "good" for alice, believed while the CRLs in force
    do not list it, and cached. A CRL published later revokes the responder: the cached answer's next use is no
    answer (UNKNOWN, naming the revoked responder), without asking the responder again. Before, the verdict on the
    responder was cached with its answer, believed until the next ask (up to crl_refresh_seconds)."""
    asyncio.run(_cached_answer_of_a_revoked_responder(pki))


async def _cached_answer_of_a_revoked_responder(pki: Pki) -> None:
    responder, key = _checked_responder(pki)
    issuing = load_cert(pki.issuing_cert)
    posts: list[bytes] = []

    async def answering(request: web.Request) -> web.Response:
        body = await request.read()
        posts.append(body)
        asked = ocsp.load_der_ocsp_request(body)
        nonce = asked.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=asked.issuer_name_hash,
            issuer_key_hash=asked.issuer_key_hash,
            serial_number=asked.serial_number,
            algorithm=hashes.SHA1(),  # noqa: S303 -- what CertIDs use
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW,
            next_update=None,
            revocation_time=None,
            revocation_reason=None,
        )
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder).certificates([responder])
        return web.Response(body=builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))

    listed: list[x509.Certificate] = []  # what the CRLs in force list

    async def judge(cert: x509.Certificate, at: datetime) -> RevocationEvidence:
        if cert in listed:
            return RevocationEvidence(RevocationStatus.REVOKED, "issuing.crl", "it is on the CRL")
        return RevocationEvidence(RevocationStatus.GOOD, "issuing.crl", "not on the CRL")

    client = OcspClient(cache_seconds=60)
    async with _serving(answering) as url:
        alice = _with_responder(pki, url)
        first = await client.status(alice, issuing, at=NOW, judge=judge)
        assert first.status is RevocationStatus.GOOD, first.detail
        listed.append(responder)  # a CRL published after the answer was taken
        later = await client.status(alice, issuing, at=NOW + timedelta(seconds=10), judge=judge)
        assert later.status is RevocationStatus.UNKNOWN, later.detail
        assert "the OCSP responder's certificate is revoked: it is on the CRL" in later.detail
        assert len(posts) == 1  # judged from the cache, not asked again
        listed.clear()  # (a failure is kept FAILURE_SECONDS, then the responder is asked again)
        again = await client.status(alice, issuing, at=NOW + timedelta(seconds=20), judge=judge)
        assert (again.status, len(posts)) == (RevocationStatus.GOOD, 2)
    await client.close()
