"""OCSP: ask the responder a certificate names whether it is revoked, and believe only a checked answer.

Theory of operation. For a verified leaf and the CA that issued it, `OcspClient.status` sends an OCSP
request (RFC 6960: one CertID with SHA-1 hashes, as RFC 5019 responders expect, and a fresh nonce) by
HTTP POST to the first http(s) OCSP URL in the leaf's authorityInfoAccess. `verify_response` accepts
the answer only if:
- the response status is successful, it carries at most `MAX_CERTIFICATES` certificates (counted from the DER
  headers before any is read: cryptography reads them in quadratic time, holding the GIL) and it holds a single
  response for exactly our CertID (serial, issuer name hash, issuer key hash);
- it is signed by the issuing CA itself, or by a responder certificate that the issuing CA issued for
  id-kp-OCSPSigning and that is valid now; the response's responder ID names that signer (4.2.2.2);
- a delegated responder's certificate is not revoked (RFC 6960 4.2.2.2.1, as CryptoAPI does): one with
  id-pkix-ocsp-nocheck is trusted for its lifetime (the CA said so; AD CS's "OCSP Response Signing" template adds
  it), one without is judged by the `judge` the caller gives (`proxy.certs.live`: the gateway's CRLs, its
  distribution point fetched where those are followed); revoked, or no current CRL speaking for it, and the answer
  is not believed (UNKNOWN, below), judged again each time its cached answer is used (`_judged_again`);
- it is fresh: thisUpdate is not in the future (beyond `CLOCK_SKEW`) and nextUpdate, if given, has
  not passed; if the responder echoed a nonce it is ours, and if it did not, thisUpdate is no older
  than `MAX_AGE` (a replayed old "good" is refused).
A checked answer (good, revoked, or the responder's "unknown") is cached per issuer key and serial until its
nextUpdate and for `cache_seconds` at most (the gateway's `crl_refresh_seconds`, also for an answer without a
nextUpdate: a revocation at the responder takes effect within one refresh, as a CRL's does); a failure to get one is
cached for `FAILURE_SECONDS`, so that a dead responder costs one timeout, not one per request. At most `size`
answers (`CACHE_SIZE`, as many as the chain memo keeps) are kept, the least recently used dropped first: every
certificate of a trusted CA is a key, and the cache was never pruned before. A "revoked" answer is kept apart, never
dropped for other answers (only the CA makes one; a churn of "good" ones would otherwise leave a revoked certificate
to a dead responder's UNKNOWN, which `ocsp = "best-effort"` serves), at most `size` of them too. Concurrent requests
for the same certificate share one exchange. What the policy makes of the answer is `proxy.certs.live`'s business;
here an answer is evidence, never a verdict.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from proxy.certs.chain import format_time
from proxy.certs.der import elements, inside, value, whole
from proxy.certs.revocation import RevocationEvidence, RevocationStatus, shown_error
from proxy.certs.sources import CrlSource, body_within

log = structlog.get_logger("proxy.ocsp")
CLOCK_SKEW = timedelta(minutes=5)
MAX_AGE = timedelta(minutes=5)  # oldest thisUpdate accepted from a responder that did not echo our nonce
FAILURE_SECONDS = 5.0
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_CERTIFICATES = 10  # attached to an answer: the responder's own, perhaps its chain (RFC 5019 wants only the first)
CACHE_SIZE = 10_000  # answers kept at most: as many as `proxy.certs.memo.VerifiedChains` keeps chains


Judge = Callable[[x509.Certificate, datetime], Awaitable[RevocationEvidence]]
"""Is this delegated responder's certificate (issued by the CA of the certificate asked about) revoked at this time?"""


class OcspError(Exception):
    """Why an OCSP answer was not obtained or not believed."""


@dataclass(frozen=True)
class _Cached:
    evidence: RevocationEvidence
    until: datetime
    responder: x509.Certificate | None = None  # a delegated responder without id-pkix-ocsp-nocheck: judged at each use


def responder_url(cert: x509.Certificate) -> str | None:
    """The first http(s) OCSP URL in the certificate's authorityInfoAccess, if any."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for description in aia:
        location = description.access_location
        if (
            description.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(location, x509.UniformResourceIdentifier)
            and location.value.startswith(("http://", "https://"))
        ):
            return location.value
    return None


def build_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes) -> ocsp.OCSPRequest:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
    return builder.add_extension(x509.OCSPNonce(nonce), critical=False).build()


def verify_response(
    der: bytes, request: ocsp.OCSPRequest, issuer: x509.Certificate, *, nonce: bytes, at: datetime, source: str
) -> tuple[RevocationEvidence, datetime | None, x509.Certificate | None]:
    """The checked answer for the certificate `request` asks about, its nextUpdate, and the delegated responder
    certificate whose revocation is still to be checked (None: signed by the CA, or by one with id-pkix-ocsp-nocheck);
    or OcspError."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response ({exc})") from exc
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"the responder answered {response.response_status.name}")
    try:  # cryptography reads some fields only when asked: an algorithm it does not know raises there
        if _certificates_attached(der) > MAX_CERTIFICATES:
            raise OcspError(f"the answer carries more than {MAX_CERTIFICATES} certificates (refused unread)")
        single = _single_response(response, request)
        responder = _check_signer(response, issuer, at)
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise OcspError(f"a response that cannot be read ({exc})") from exc
    this_update, next_update = single.this_update_utc, single.next_update_utc
    if this_update > at + CLOCK_SKEW:
        raise OcspError(f"the answer's thisUpdate {format_time(this_update)} is in the future")
    if next_update is not None and next_update < at:
        raise OcspError(f"the answer is stale: its nextUpdate was {format_time(next_update)}")
    _check_nonce(response, nonce, this_update, at)
    serial = f"serial 0x{request.serial_number:x}"
    times = {"crl_this_update": this_update, "crl_next_update": next_update}
    status = single.certificate_status
    if status is ocsp.OCSPCertStatus.GOOD:
        good = RevocationEvidence(RevocationStatus.GOOD, source, f"{serial} is good per OCSP", **times)
        return good, next_update, responder
    if status is ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        reason = single.revocation_reason.value if single.revocation_reason else "unspecified"
        detail = f"{serial} was revoked on {format_time(when) if when else '?'} (reason {reason}, per OCSP)"
        revoked = RevocationEvidence(RevocationStatus.REVOKED, source, detail, **times, revoked_at=when)
        return revoked, next_update, responder
    detail = f"the OCSP responder does not know {serial}"
    return RevocationEvidence(RevocationStatus.UNKNOWN, source, detail, **times), next_update, responder


class OcspClient:
    """Asks responders, checks and caches their answers."""

    def __init__(self, *, cache_seconds: float, timeout: float = 5.0, size: int = CACHE_SIZE) -> None:
        self._cache_for = timedelta(seconds=cache_seconds)
        self._timeout = timeout
        self._size = size
        self._cache: OrderedDict[tuple[bytes, int], _Cached] = OrderedDict()  # least recently used first
        self._revoked: OrderedDict[tuple[bytes, int], _Cached] = OrderedDict()  # "revoked" answers, apart
        self._pending: dict[tuple[bytes, int], asyncio.Future[RevocationEvidence]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def status(
        self, cert: x509.Certificate, issuer: x509.Certificate, *, at: datetime, judge: Judge | None = None
    ) -> RevocationEvidence:
        """Evidence from the responder `cert` names: GOOD, REVOKED, or UNKNOWN (with the reason). `judge` says whether
        a delegated responder's certificate without id-pkix-ocsp-nocheck is revoked; without one, no such responder
        is believed."""
        url = responder_url(cert)
        if url is None:
            return RevocationEvidence(RevocationStatus.UNKNOWN, "", "the certificate names no OCSP responder")
        key = (x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest, cert.serial_number)
        table = self._revoked if key in self._revoked else self._cache
        cached = table.get(key)
        if cached is not None and at <= cached.until:
            table.move_to_end(key)
            return (
                cached.evidence if cached.responder is None else await self._judged_again(key, cert, cached, judge, at)
            )
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[RevocationEvidence] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            evidence, until, responder = await self._ask(url, cert, issuer, at, judge)
            self._keep(key, _Cached(evidence, until, responder))
            future.set_result(evidence)
            return evidence
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._pending[key]

    async def _judged_again(
        self, key: tuple[bytes, int], cert: x509.Certificate, cached: _Cached, judge: Judge | None, at: datetime
    ) -> RevocationEvidence:
        """A cached answer of a delegated responder whose certificate has no id-pkix-ocsp-nocheck, its certificate
        judged again at `cached`'s use, by the CRLs in force (a look-up in the set, which remembers its verdicts): a
        CRL published after the answer was taken may revoke the responder, and its answer was believed until the
        next ask (as long as `crl_refresh_seconds`). Not believed, the answer is no answer, as `_ask` makes it."""
        try:
            _check_responder(await judge(cached.responder, at) if judge and cached.responder else None)
        except OcspError as exc:
            failed, until = _failed(cached.evidence.source, cert, shown_error(str(exc)), at)
            self._keep(key, _Cached(failed, until))
            return failed
        return cached.evidence

    def _keep(self, key: tuple[bytes, int], cached: _Cached) -> None:
        """`cached` the answer for `key`, in its table: a "revoked" one where other answers never evict it."""
        self.forget(*key)
        table = self._revoked if cached.evidence.status is RevocationStatus.REVOKED else self._cache
        table[key] = cached
        while len(table) > self._size:
            table.popitem(last=False)

    @property
    def kept(self) -> int:
        """Answers kept (tests, docs/hardening.md); not `__len__`: an empty client would be false."""
        return len(self._cache) + len(self._revoked)

    def forget(self, issuer_key_digest: bytes, serial: int) -> None:
        self._cache.pop((issuer_key_digest, serial), None)
        self._revoked.pop((issuer_key_digest, serial), None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ask(
        self, url: str, cert: x509.Certificate, issuer: x509.Certificate, at: datetime, judge: Judge | None
    ) -> tuple[RevocationEvidence, datetime, x509.Certificate | None]:
        """The checked answer, until when it is kept, and the delegated responder to judge again at each use."""
        nonce = os.urandom(16)
        request = build_request(cert, issuer, nonce)
        shown = CrlSource(url)  # the URL as every output names it: no password, no query's values (a signed URL's)
        try:
            der = await self._post(url, request.public_bytes(serialization.Encoding.DER))
            evidence, next_update, responder = verify_response(
                der, request, issuer, nonce=nonce, at=at, source=shown.name
            )
            if responder is not None:
                _check_responder(await judge(responder, at) if judge is not None else None)
        except (OcspError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            words = shown_error(shown.scrubbed(str(exc) or type(exc).__name__))  # scrubbed whole, then cut short
            return (*_failed(shown.name, cert, words, at), None)
        log.info("ocsp_answer", responder=shown.name, serial=f"{cert.serial_number:x}", status=evidence.status.value)
        until = min(next_update, at + self._cache_for) if next_update else at + self._cache_for
        return evidence, until, responder

    async def _post(self, url: str, body: bytes) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        headers = {"Content-Type": "application/ocsp-request", "Accept": "application/ocsp-response"}
        async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise OcspError(f"HTTP {response.status}")
            der = await body_within(response, MAX_RESPONSE_BYTES)  # to its end (one segment was read as the whole)
            if der is None:
                raise OcspError(f"response too large (more than {MAX_RESPONSE_BYTES} bytes)")
            return der


def _failed(shown: str, cert: x509.Certificate, words: str, at: datetime) -> tuple[RevocationEvidence, datetime]:
    """No usable answer from the responder `shown` (why: `words`), logged, and until when that is kept."""
    detail = f"no usable answer from the OCSP responder {shown}: {words}"
    log.warning("ocsp_failed", responder=shown, serial=f"{cert.serial_number:x}", error=words)
    failed = RevocationEvidence(RevocationStatus.UNKNOWN, shown, detail)
    return failed, at + timedelta(seconds=FAILURE_SECONDS)


# --- checking a response ---------------------------------------------------------------------------


def _single_response(response: ocsp.OCSPResponse, request: ocsp.OCSPRequest) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if (
            single.serial_number == request.serial_number
            and single.issuer_key_hash == request.issuer_key_hash
            and single.issuer_name_hash == request.issuer_name_hash
            and single.hash_algorithm.name == request.hash_algorithm.name
        ):
            return single
    raise OcspError("the response does not answer for the certificate asked about")


def _check_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, at: datetime) -> x509.Certificate | None:
    """The signature is the issuing CA's, or that of a responder certificate it issued for OCSP signing; that
    certificate if its revocation is still to be checked (it has no id-pkix-ocsp-nocheck), else None."""
    if _names(response, issuer):
        _check_signature(response, issuer)
        return None
    for candidate in response.certificates:
        if not _names(response, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise OcspError("the responder's certificate was not issued by the certificate's CA") from exc
        try:
            usages = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
            raise OcspError("the responder's certificate is not issued for OCSP signing")
        if not candidate.not_valid_before_utc <= at <= candidate.not_valid_after_utc:
            raise OcspError("the responder's certificate is outside its validity period")
        _check_signature(response, candidate)
        return None if _no_check(candidate) else candidate
    raise OcspError("the response is signed by neither the CA nor a responder it authorised")


def _check_responder(evidence: RevocationEvidence | None) -> None:
    """OcspError unless the delegated responder's certificate is known not to be revoked (RFC 6960 4.2.2.2.1)."""
    if evidence is not None and evidence.status is RevocationStatus.GOOD:
        return
    if evidence is not None and evidence.status is RevocationStatus.REVOKED:
        raise OcspError(f"the OCSP responder's certificate is revoked: {evidence.detail}")
    why = evidence.detail if evidence is not None else "no CRL is consulted for it"
    raise OcspError(
        "the OCSP responder's certificate cannot be checked for revocation "
        f"({why}): issue it with id-pkix-ocsp-nocheck, or publish a CRL that covers it (RFC 6960 4.2.2.2.1)"
    )


def _certificates_attached(der: bytes) -> int:
    """How many certificates a successful answer carries (BasicOCSPResponse's `certs`), counted from the DER headers
    alone, MAX_CERTIFICATES + 1 at most. `OCSPResponse.certificates` reads them all, in time quadratic in their
    number and holding the GIL (3,000 in 800 KB: 4-8 s here), so it is not asked before they are counted."""
    try:
        status_and_bytes = inside(der, whole(der))  # OCSPResponse: responseStatus, [0] EXPLICIT ResponseBytes
        response_bytes = inside(der, inside(der, status_and_bytes[1])[0])  # responseType, response OCTET STRING
        basic = inside(der, response_bytes[1])[0]  # the OCTET STRING holds the BasicOCSPResponse
        certs = [part for part in inside(der, basic) if part[0] == 0xA0]  # after tbs, algorithm and signature
        if not certs:
            return 0
        count = 0
        for _ in elements(der, *value(der, inside(der, certs[0])[0])):  # [0] EXPLICIT SEQUENCE OF Certificate
            count += 1
            if count > MAX_CERTIFICATES:
                break
    except IndexError as exc:
        raise ValueError("a BasicOCSPResponse cut short") from exc
    return count


def _no_check(cert: x509.Certificate) -> bool:
    """Does the responder certificate carry id-pkix-ocsp-nocheck (1.3.6.1.5.5.7.48.1.5), "trust me for my lifetime"?"""
    try:
        cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    except x509.ExtensionNotFound:
        return False
    return True


def _names(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    """Does the response's responder ID (by name or by key hash) name `cert`?"""
    if response.responder_name is not None:
        return response.responder_name == cert.subject
    digest = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return response.responder_key_hash == digest


def _check_signature(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    key = signer.public_key()
    data, signature, algorithm = response.tbs_response_bytes, response.signature, response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, dsa.DSAPublicKey) and algorithm is not None:
            key.verify(signature, data, algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            raise OcspError(f"unsupported signature ({type(key).__name__})")
    except InvalidSignature as exc:
        raise OcspError("the response's signature does not verify") from exc


def _check_nonce(response: ocsp.OCSPResponse, nonce: bytes, this_update: datetime, at: datetime) -> None:
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        if this_update < at - MAX_AGE:
            raise OcspError(f"no nonce, and thisUpdate {format_time(this_update)} is too old") from None
        return
    if echoed != nonce:
        raise OcspError("the response's nonce is not the one sent (a replayed answer?)")
