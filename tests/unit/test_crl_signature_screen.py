"""The CRL signature screen (`proxy.certs.revocation._screened`): it refuses, for a hash's cost, only what
cryptography's `is_signature_valid` refuses, whatever the CA's key and signature algorithm, from DER or PEM; and how
a fetch's error is shown (`shown_error`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from proxy.certs.chain import TrustList
from proxy.certs.revocation import (
    MAX_ERROR_SHOWN,
    CrlUnusable,
    _screened,
    accept,
    accept_der,
    crl_ders,
    read_crls,
    shown_error,
)
from tests.pem import der_tlv

NOW = datetime(2026, 12, 1, tzinfo=UTC)
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Screen CA")])
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)

Key = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
CURVES = {"ec-256": ec.SECP256R1(), "ec-384": ec.SECP384R1(), "ec-521": ec.SECP521R1()}
HASHES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "ec-384": hashes.SHA384(),
    "ec-521": hashes.SHA512(),
    "rsa-4096": hashes.SHA512(),
    "rsa-pss-384": hashes.SHA384(),
}
PADDINGS = {"rsa-pss": PSS, "rsa-pss-384": padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)}


def _key(kind: str) -> Key:
    if kind == "dsa":
        return dsa.generate_private_key(key_size=2048)
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=4096 if kind == "rsa-4096" else 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    return ec.generate_private_key(CURVES[kind])


def self_signed_ca(key: Key) -> x509.Certificate:
    """A CA certificate named NAME for `key`, signed by it, valid a day before NOW to 30 days after."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(
        key, None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    )


def _crl(key: Key, kind: str, encoding: serialization.Encoding) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(NAME)
    builder = builder.last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=1))
    for serial in range(2, 200):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(days=1))
        builder = builder.add_revoked_certificate(entry.build())
    builder = builder.add_extension(x509.CRLNumber(7), critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        crl = builder.sign(key, None)
    else:
        crl = builder.sign(key, HASHES.get(kind, hashes.SHA256()), rsa_padding=PADDINGS.get(kind))
    return crl.public_bytes(encoding)


@pytest.mark.parametrize("encoding", [serialization.Encoding.DER, serialization.Encoding.PEM], ids=["der", "pem"])
@pytest.mark.parametrize(
    "kind", ["ec-256", "ec-384", "ec-521", "rsa-pkcs1", "rsa-4096", "rsa-pss", "rsa-pss-384", "ed25519", "ed448", "dsa"]
)
def test_a_crl_the_ca_signed_is_accepted_and_another_keys_refused(kind: str, encoding: serialization.Encoding) -> None:
    """The CA's own CRL is accepted with its DER screened (ECDSA P-256/SHA-256, P-384/SHA-384, P-521/SHA-512; RSA
    PKCS#1 v1.5 with SHA-256, RSA 4096 with SHA-512, PSS with SHA-256 and with SHA-384; Ed25519, Ed448; DSA; DER and
    PEM), read first or not (`accept_der`, a fetch's way); the same CRL signed by another key of that kind is refused
    as not verifying."""
    key = _key(kind)
    trust = TrustList(anchors=(self_signed_ca(key),))
    data = _crl(key, kind, encoding)
    ((crl, der),) = read_crls(data, "screen")
    assert der == crl.public_bytes(serialization.Encoding.DER)  # what the screen checks the signature over
    assert crl_ders(data, "screen") == [der]
    assert _screened(crl, trust.anchors[0].public_key(), der) is True  # verified: cryptography is not asked again
    assert accept("screen", crl, trust, at=NOW, der=der).number == 7
    assert accept_der("screen", der, trust, at=NOW).number == 7
    ((forged, forged_der),) = read_crls(_crl(_key(kind), kind, encoding), "screen")
    assert _screened(forged, trust.anchors[0].public_key(), forged_der) is False  # refused for a hash's cost
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept("screen", forged, trust, at=NOW, der=forged_der)
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept_der("screen", forged_der, trust, at=NOW)


def _with_headers(pem: bytes) -> bytes:
    """`pem` with RFC 1421 headers after its BEGIN line, CRLF line ends (cryptography reads it)."""
    begin, _, rest = pem.partition(b"\n")
    headers = b"Proc-Type: 4,CRL\nX-Comment: issued by the screen CA\n\n"
    return (begin + b"\n" + headers + rest).replace(b"\n", b"\r\n")


@pytest.mark.parametrize("kind", ["ec-256", "dsa"])
def test_a_pem_crl_with_headers_is_screened_too(kind: str) -> None:
    """A PEM CRL with headers (cryptography reads it) keeps its DER for the screen: the CA's own is accepted, one signed
    by another key is refused by the screen (before, no DER: `is_signature_valid` alone, seconds for a huge CRL)."""
    key = _key(kind)
    trust = TrustList(anchors=(self_signed_ca(key),))
    ((crl, der),) = read_crls(_with_headers(_crl(key, kind, serialization.Encoding.PEM)), "screen")
    assert der == crl.public_bytes(serialization.Encoding.DER)
    assert accept("screen", crl, trust, at=NOW, der=der).number == 7
    ((forged, forged_der),) = read_crls(_with_headers(_crl(_key(kind), kind, serialization.Encoding.PEM)), "screen")
    assert _screened(forged, trust.anchors[0].public_key(), forged_der) is False


def test_a_fetch_error_is_shown_on_one_line_cut_short() -> None:
    """`shown_error`: aiohttp's multi-line quote of a server's bytes on one line, control characters (ESC, BEL) as
    escapes (the line separator a space), 300 characters at most with the full length named; a short one as it was."""
    said = 'Invalid header token:\n\n  b"X-Long\x01"\x1b[31m\a\u2028' + "B" * 8000 + "\n   ^"
    shown = shown_error(said)
    assert len(shown) <= MAX_ERROR_SHOWN == 300
    assert shown.startswith('Invalid header token: b"X-Long\\x01"\\x1b[31m\\x07 BBB')  # U+2028 is a line break
    assert shown.endswith("BBB... (8050 characters)")
    assert not any(ord(c) < 0x20 for c in shown)
    assert shown_error("HTTP 503") == "HTTP 503"


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytes([40 * first + second])
    for number in rest:
        groups = [number & 0x7F]
        while number := number >> 7:
            groups.append(0x80 | number & 0x7F)
        body += bytes(reversed(groups))
    return der_tlv(0x06, body)


def _crl_with_algorithm(dotted: str) -> bytes:
    """A current DER CRL under the CA's name whose signatureAlgorithm is `dotted` (its tbsCertList's too), with a
    signature of no key: what anyone on a distribution point's path can send."""
    algorithm = der_tlv(0x30, _oid(dotted))

    def utc(when: datetime) -> bytes:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())

    times = utc(NOW - timedelta(minutes=1)) + utc(NOW + timedelta(days=1))
    tbs = der_tlv(0x30, der_tlv(0x02, b"\x01") + algorithm + NAME.public_bytes() + times)
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + b"\x30\x06\x02\x01\x01\x02\x01\x01"))


@pytest.mark.parametrize("kind", ["ec-256", "rsa-pkcs1", "ed25519"])
@pytest.mark.parametrize("dotted", ["1.2.840.113549.1.1.16", "1.2.3.4"], ids=["sha512-256-rsa", "unknown"])
def test_a_crl_signed_with_an_algorithm_cryptography_does_not_know_is_refused(kind: str, dotted: str) -> None:
    """A CRL under the CA's name whose signature algorithm cryptography does not know (sha512-256WithRSAEncryption,
    an OID of no algorithm) is refused as not verifying, as `is_signature_valid` answers (False). Before, the screen
    asked for its hash algorithm first and cryptography's UnsupportedAlgorithm left `accept`: a refresh round with
    such a CRL at one distribution point ended before the new CRL set was swapped in."""
    key = _key(kind)
    trust = TrustList(anchors=(self_signed_ca(key),))
    ((forged, der),) = read_crls(_crl_with_algorithm(dotted), "screen")
    assert forged.is_signature_valid(key.public_key()) is False
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept("screen", forged, trust, at=NOW, der=der)
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept_der("screen", der, trust, at=NOW)


def _rsa_crl(key: rsa.RSAPrivateKey, algorithm: bytes, tbs_tail: bytes = b"", extensions: bytes = b"") -> bytes:
    """A DER CRL under the CA's name with `algorithm` (an AlgorithmIdentifier's DER) and `tbs_tail` (revoked
    certificates) and `extensions` ([0]) in its tbsCertList, signed by `key` with PKCS#1 v1.5 and SHA-256."""

    def utc(when: datetime) -> bytes:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())

    times = utc(NOW - timedelta(minutes=1)) + utc(NOW + timedelta(days=1))
    tbs = der_tlv(0x30, der_tlv(0x02, b"\x01") + algorithm + NAME.public_bytes() + times + tbs_tail + extensions)
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + signature))


SHA256_RSA = _oid("1.2.840.113549.1.1.11")
ENTRY = der_tlv(0x30, der_tlv(0x02, b"\x05") + der_tlv(0x17, b"261130000000Z"))


@pytest.mark.parametrize(
    ("algorithm", "tbs_tail", "extensions"),
    [
        (der_tlv(0x30, SHA256_RSA), b"", b""),
        (der_tlv(0x30, SHA256_RSA + b"\x05\x00"), der_tlv(0x30, b""), b""),
        (der_tlv(0x30, SHA256_RSA + b"\x05\x00"), der_tlv(0x30, ENTRY * 3), b""),
        # deltaCRLIndicator 5 (critical); issuingDistributionPoint indirectCRL (critical) with a certificateIssuer entry
        (
            der_tlv(0x30, SHA256_RSA + b"\x05\x00"),
            der_tlv(0x30, ENTRY),
            der_tlv(
                0xA0,
                der_tlv(
                    0x30, der_tlv(0x30, _oid("2.5.29.27") + b"\x01\x01\xff" + der_tlv(0x04, der_tlv(0x02, b"\x05")))
                ),
            ),
        ),
        (
            der_tlv(0x30, SHA256_RSA + b"\x05\x00"),
            der_tlv(0x30, ENTRY),
            der_tlv(
                0xA0,
                der_tlv(
                    0x30,
                    der_tlv(0x30, _oid("2.5.29.28") + b"\x01\x01\xff" + der_tlv(0x04, der_tlv(0x30, b"\x84\x01\xff"))),
                ),
            ),
        ),
    ],
    ids=["no-null-parameters", "empty-sequence-of-entries", "three-entries", "delta", "indirect"],
)
def test_the_screen_and_cryptography_agree_on_crls_of_other_shapes(
    algorithm: bytes, tbs_tail: bytes, extensions: bytes
) -> None:
    """CRLs of the shapes CAs send (sha256WithRSAEncryption without its NULL parameters, an empty SEQUENCE of revoked
    certificates, a delta CRL, an indirect CRL's issuingDistributionPoint) pass the screen exactly when
    cryptography's `is_signature_valid` accepts them: signed by the CA's key, accepted; by another, refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    trust = TrustList(anchors=(self_signed_ca(key),))
    ((crl, der),) = read_crls(_rsa_crl(key, algorithm, tbs_tail, extensions), "screen")
    assert crl.is_signature_valid(key.public_key())
    assert _screened(crl, key.public_key(), der)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ((forged, forged_der),) = read_crls(_rsa_crl(other, algorithm, tbs_tail, extensions), "screen")
    assert not forged.is_signature_valid(key.public_key())
    assert not _screened(forged, key.public_key(), forged_der)
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept_der("screen", forged_der, trust, at=NOW)
    if extensions and b"\x55\x1d\x1b" in extensions:  # a delta CRL is read, not accepted alone: the screen decides
        return
    assert accept("screen", crl, trust, at=NOW, der=der).issuer == NAME
    assert accept_der("screen", der, trust, at=NOW).issuer == NAME


@pytest.mark.parametrize("version", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("next_update", [True, False], ids=["next-update", "none"])
def test_the_outline_of_a_crl_of_each_header_reads_as_the_crl(version: bool, next_update: bool) -> None:
    """`accept_der` reads a CRL's outline (its tbsCertList to the update times) with or without a version and a
    nextUpdate: the CA's own is accepted, or refused for having no nextUpdate (read whole, as `accept` refuses it);
    one signed by another key is refused for its signature; bytes that are not a CertificateList, or one cut short,
    are not a CRL."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    trust = TrustList(anchors=(self_signed_ca(key),))
    algorithm = der_tlv(0x30, SHA256_RSA + b"\x05\x00")

    def signed(by: rsa.RSAPrivateKey) -> bytes:
        times = der_tlv(0x17, b"261130230000Z") + (der_tlv(0x18, b"20261202000000Z") if next_update else b"")
        head = (der_tlv(0x02, b"\x01") if version else b"") + algorithm + NAME.public_bytes() + times
        tbs = der_tlv(0x30, head + der_tlv(0x30, ENTRY * 2))
        return der_tlv(
            0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + by.sign(tbs, padding.PKCS1v15(), hashes.SHA256()))
        )

    if next_update:
        assert accept_der("screen", signed(key), trust, at=NOW).issuer == NAME
    else:
        with pytest.raises(CrlUnusable, match="has no nextUpdate"):
            accept_der("screen", signed(key), trust, at=NOW)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CrlUnusable, match="signature does not verify"):
        accept_der("screen", signed(other), trust, at=NOW)
    for junk in (b"", b"<html>proxy error</html>", der_tlv(0x30, b""), signed(key)[:-1], der_tlv(0x30, algorithm * 3)):
        with pytest.raises(ValueError, match="screen: not a PEM or DER CRL"):
            accept_der("screen", junk, trust, at=NOW)
